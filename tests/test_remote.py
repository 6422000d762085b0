"""Sharing a run through a DVC remote: `dvc push` to S3, then `git clone` + `dvc pull` elsewhere, and
`dvc repro` there has nothing to run.

The S3 server is moto's, on 127.0.0.1, with dummy credentials; no AWS configuration of the machine is read.
The pushed run is `short_pipeline` (conftest.py), shared with the kill test.
"""

import pytest

from tests.pipeline_copy import clone_workspace, stages_that_ran

pytestmark = pytest.mark.remote

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.moto_server.threaded_moto_server")

BUCKET = "pipeline-runs"
REMOTE = f"s3://{BUCKET}/gpt"


@pytest.fixture(scope="module")
def s3_endpoint():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def _use_local_s3(workspace):
    """Dummy credentials in the environment, and nothing from ~/.aws or the machine's AWS settings."""
    for key in [key for key in workspace.env if key.startswith("AWS_")]:
        del workspace.env[key]
    empty = workspace.home / "aws-empty-config"
    empty.touch()
    workspace.env.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=str(empty),
        AWS_SHARED_CREDENTIALS_FILE=str(empty),
        AWS_EC2_METADATA_DISABLED="true",
        NO_PROXY="127.0.0.1,localhost",
    )


def _bucket_objects(endpoint):
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


@pytest.fixture(scope="module")
def shared(short_pipeline, s3_endpoint, tmp_path_factory):
    """Pushes the run and commits it, then clones that commit and pulls into the clone."""
    origin, _ = short_pipeline
    boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=BUCKET)
    _use_local_s3(origin)
    origin.dvc("remote", "add", "--default", "storage", REMOTE)
    origin.dvc("remote", "modify", "storage", "endpointurl", s3_endpoint)
    push = origin.dvc("push")
    origin.commit("the run: dvc.lock, metrics and the remote")

    clone = clone_workspace(origin, tmp_path_factory, "pulled-pipeline")
    _use_local_s3(clone)
    pull = clone.dvc("pull")
    return {"origin": origin, "clone": clone, "push": push, "pull": pull, "objects": _bucket_objects(s3_endpoint)}


def test_push_uploads_the_cache_to_the_bucket(shared):
    assert shared["objects"], shared["push"]
    assert all(key.startswith("gpt/files/md5/") for key in shared["objects"]), shared["objects"][:5]


def test_pull_restores_every_output_byte_for_byte(shared):
    origin, clone = shared["origin"], shared["clone"]
    outputs = [path for stage in origin.stages() for path in origin.outputs(stage)]
    pulled = clone.digests(outputs)
    assert pulled == origin.digests(outputs)
    assert "data/tokens/meta.json" in pulled and "serve/models/chat/model.safetensors" in pulled


def test_the_clone_is_up_to_date_and_repro_runs_nothing(shared):
    clone = shared["clone"]
    assert not list(clone.root.glob("checkpoints/*")), "checkpoints are neither in git nor in the remote"
    assert clone.status() == {}
    output = clone.dvc("repro")
    assert stages_that_ran(output) == set(), output[-3000:]
