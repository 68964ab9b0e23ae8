#!/bin/sh
# jetscribe's PostgreSQL roles, made by the postgres image at the first start of an empty data volume
# (/docker-entrypoint-initdb.d), each with its password from a compose secret; what each may do is granted by the
# owner in the migrate job (`jetscribe db upgrade`, services/persister/roles.py). The roles of `jetscribe up` are the
# same (jetscribe/devstack/pgroles.py).
set -eu
secrets="${JETSCRIBE_SECRETS_DIR:-/run/secrets}"  # compose mounts the secrets there

make_role() {  # name, secret file: psql reads the password from the file itself, so no command line holds it
    [ -s "$secrets/$2" ] || { echo "roles.sh: no secret $secrets/$2: $1 not made" >&2; exit 1; }
    psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
        -v name="$1" -v secret="$secrets/$2" <<'SQL'
\set password `cat :'secret'`
CREATE ROLE :"name" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'password';
SQL
}

make_role jetscribe_owner pg_owner_password
make_role jetscribe_persister pg_persister_password
make_role jetscribe_reader pg_reader_password
# The owner owns the database, and so (PostgreSQL 15+) its schema public: it alone makes tables there.
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -c "ALTER DATABASE \"$POSTGRES_DB\" OWNER TO jetscribe_owner"
