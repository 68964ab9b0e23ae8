"""The nats-server configuration a node of the local stack runs with (jetscribe/devstack/servers.py)."""

from pathlib import Path

from jetscribe.devstack.servers import ClusterRoutes, NatsCluster, nats_config


def test_a_single_server_has_jetstream_and_16mb_payloads_and_no_cluster():
    text = nats_config("127.0.0.1", 4222, Path("/data/js"))
    assert 'listen: "127.0.0.1:4222"' in text and "max_payload: 16MB" in text
    assert 'store_dir: "/data/js"' in text
    assert "cluster" not in text and "server_name" not in text and "http" not in text


def test_a_cluster_node_is_named_routes_to_every_node_and_serves_healthz():
    routes = ClusterRoutes("jetscribe", 6223, ("nats-route://127.0.0.1:6222", "nats-route://127.0.0.1:6223"))
    text = nats_config("127.0.0.1", 4223, Path("/data/n2/js"), server_name="n2", cluster=routes, monitor_port=8223)
    assert 'server_name: "n2"' in text and 'http: "127.0.0.1:8223"' in text
    assert 'name: "jetscribe"' in text and 'listen: "127.0.0.1:6223"' in text
    assert "nats-route://127.0.0.1:6222" in text and "nats-route://127.0.0.1:6223" in text


def test_a_cluster_gives_each_node_its_own_ports_store_and_name(tmp_path):
    cluster = NatsCluster(tmp_path, 3)
    names = [node.server_name for node in cluster.nodes]
    assert names == ["n1", "n2", "n3"]
    ports = [p for node in cluster.nodes for p in (node.port, node.cluster.port, node.monitor_port)]
    assert len(set(ports)) == 9
    assert len({node.store_dir for node in cluster.nodes}) == 3
    assert cluster.url == ",".join(node.url for node in cluster.nodes)
    assert all(node.cluster.routes == cluster.nodes[0].cluster.routes for node in cluster.nodes)
    assert cluster.node("n2") is cluster.nodes[1]
