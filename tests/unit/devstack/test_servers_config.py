"""A cluster node's nats-server configuration (jetscribe/devstack/servers.py, shared/natsauth.py's server_config)."""

from pathlib import Path

from jetscribe.devstack.servers import NatsCluster
from jetscribe.shared.natsauth import Cluster, server_config


def test_a_cluster_node_is_named_routes_to_every_node_and_serves_healthz():
    routes = ("nats-route://127.0.0.1:6222", "nats-route://127.0.0.1:6223")
    text = server_config(
        host="127.0.0.1",
        port=4223,
        store_dir=str(Path("/data/n2/js")),
        users=None,
        server_name="n2",
        cluster=Cluster("jetscribe", "127.0.0.1:6223", routes),
        monitor_port=8223,
    )
    assert 'server_name: "n2"' in text and 'http: "127.0.0.1:8223"' in text
    assert '"jetscribe"' in text and '"127.0.0.1:6223"' in text
    assert "nats-route://127.0.0.1:6222" in text and "nats-route://127.0.0.1:6223" in text
    assert "http" not in server_config(host="127.0.0.1", port=4222, store_dir="/data/js", users=None)


def test_a_cluster_gives_each_node_its_own_ports_store_and_name_and_one_set_of_users(tmp_path):
    cluster = NatsCluster(tmp_path, 3)
    names = [node.server_name for node in cluster.nodes]
    assert names == ["n1", "n2", "n3"]
    ports = [node.port for node in cluster.nodes] + [node.monitor_port for node in cluster.nodes]
    ports += [int(node.cluster.listen.rsplit(":", 1)[1]) for node in cluster.nodes]
    assert len(set(ports)) == 9
    assert len({node.store_dir for node in cluster.nodes}) == 3
    assert cluster.url == ",".join(node.url for node in cluster.nodes)
    assert all(node.cluster.routes == cluster.nodes[0].cluster.routes for node in cluster.nodes)
    assert all(node.keyring is cluster.keyring for node in cluster.nodes)
    assert cluster.node("n2") is cluster.nodes[1]
    cluster.nodes[1].write_config()
    text = cluster.nodes[1].config_path.read_text()
    assert "authorization" in text and 'server_name: "n2"' in text
