"""The service fixtures are real: a PostgreSQL server and a moto S3 endpoint, reached by DuckDB with extensions that
load only from the ``duckdb-ext-*`` wheels (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest


def offline_duckdb() -> duckdb.DuckDBPyConnection:
    import duckdb_ext

    ext_dir = Path(list(duckdb_ext.__path__)[0]) / "extensions"
    assert ext_dir.is_dir(), ext_dir
    return duckdb.connect(config={"extension_directory": str(ext_dir), "autoinstall_known_extensions": False,
                                  "autoload_known_extensions": False})


def test_postgres_server_is_real(postgres_server):
    assert postgres_server.host == "127.0.0.1" and postgres_server.user == "postgres"
    assert postgres_server.port != 5432
    assert postgres_server.psql("SHOW server_version").startswith("15")
    conninfo = postgres_server.create_database("probe_db")
    assert conninfo == f"dbname=probe_db host=127.0.0.1 port={postgres_server.port} user=postgres"
    assert "probe_db" in postgres_server.psql("SELECT datname FROM pg_database").split()


def test_duckdb_postgres_extension_round_trip(postgres_server, postgres_db):
    con = offline_duckdb()
    try:
        con.execute("LOAD postgres")
        con.execute(f"ATTACH '{postgres_db}' AS pg (TYPE postgres)")
        con.execute("CREATE TABLE pg.clips AS SELECT i AS id, 'clip' || i AS name, i * 0.5 AS score FROM range(5) t(i)")
        rows = con.execute("SELECT id, name, score FROM pg.clips ORDER BY id").fetchall()
        con.execute("DETACH pg")
    finally:
        con.close()
    assert rows == [(i, f"clip{i}", i * 0.5) for i in range(5)]
    # The table lives in the server, seen by a different client.
    dbname = postgres_db.split()[0].removeprefix("dbname=")
    assert postgres_server.psql("SELECT count(*), sum(id) FROM clips", dbname=dbname).strip() == "5|10"


def test_s3_server_is_real(s3_server, s3_bucket):
    assert s3_server.endpoint_url == f"http://127.0.0.1:{s3_server.port}"
    assert s3_server.env == {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                             "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
                             "AWS_ENDPOINT_URL": s3_server.endpoint_url}
    s3 = s3_server.client()
    s3.put_object(Bucket=s3_bucket, Key="a/b.txt", Body=b"hello")
    assert s3.get_object(Bucket=s3_bucket, Key="a/b.txt")["Body"].read() == b"hello"
    assert s3_bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]]


def test_ducklake_catalog_on_postgres_data_on_s3(postgres_server, postgres_db, s3_server, s3_bucket):
    con = offline_duckdb()
    try:
        for ext in ("ducklake", "postgres", "httpfs"):
            con.execute(f"LOAD {ext}")
        con.execute(f"""CREATE SECRET (TYPE s3, KEY_ID 'testing', SECRET 'testing', REGION 'us-east-1',
                        ENDPOINT '{s3_server.host_port}', URL_STYLE 'path', USE_SSL false)""")
        con.execute(f"ATTACH 'ducklake:postgres:{postgres_db}' AS lake (DATA_PATH 's3://{s3_bucket}/lake/')")
        con.execute("CREATE TABLE lake.clips (id INTEGER, batch VARCHAR, score DOUBLE)")
        con.execute("INSERT INTO lake.clips SELECT i, 'b' || (i % 2), i / 10 FROM range(10) t(i)")
        con.execute("BEGIN")
        con.execute("DELETE FROM lake.clips WHERE batch = 'b0'")
        con.execute("INSERT INTO lake.clips VALUES (100, 'b0', 1.0)")
        con.execute("COMMIT")
        rows = con.execute("SELECT batch, count(*) FROM lake.clips GROUP BY batch ORDER BY batch").fetchall()
        first = con.execute("SELECT count(*) FROM lake.clips AT (VERSION => 2)").fetchone()[0]
        con.execute("DETACH lake")
    finally:
        con.close()
    assert rows == [("b0", 1), ("b1", 5)]
    assert first == 10
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket, Prefix="lake/").get("Contents", [])]
    assert any(k.endswith(".parquet") for k in keys), keys
    # The catalog is in Postgres: DuckLake's metadata tables exist in that database.
    dbname = postgres_db.split()[0].removeprefix("dbname=")
    tables = postgres_server.psql("SELECT tablename FROM pg_tables WHERE tablename LIKE 'ducklake_%'", dbname=dbname)
    assert "ducklake_snapshot" in tables.split()


@pytest.mark.parametrize("name", ["bad name", "x;drop"])
def test_create_database_rejects_odd_names(postgres_server, name):
    with pytest.raises(ValueError):
        postgres_server.create_database(name)
