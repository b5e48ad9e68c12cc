"""`kubellm fetch-model` against a real S3-compatible server (moto's server mode, its own process): the bytes
arrive equal, progress lines say how far it is while it runs, the model's config is left in the termination
message (for the operator's fit check), a complete copy is not downloaded again, the
model cache's wait holds until the copy is complete, and bad input ends with a clear message."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from kubellm import fit
from kubellm.downloads import COMPLETE_MARKER, last_progress, parse_config_report, parse_progress_line
from tests.support.s3 import downloader_env, moto_s3, s3_client, upload_tree

BIG = 48 << 20  # large enough that the download takes many progress intervals


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    with moto_s3(log_path=tmp_path_factory.mktemp("moto") / "moto.log") as url:
        yield url


@pytest.fixture(scope="module")
def model_in_s3(endpoint, tmp_path_factory) -> dict[str, bytes]:
    from kubellm.weights.tiny import make_tiny_model

    src = tmp_path_factory.mktemp("src") / "tiny"
    make_tiny_model(str(src), "llama")
    (src / "extra").mkdir()
    (src / "extra" / "blob.bin").write_bytes(os.urandom(BIG))
    put = upload_tree(endpoint, "models", "tiny", src)
    s3_client(endpoint).put_object(Bucket="models", Key="tiny2/not-this.json", Body=b"{}")  # a sibling prefix
    return put


def fetch(endpoint: str, uri: str, dest: pathlib.Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kubellm.cli", "fetch-model", uri, str(dest), *extra],
        env=downloader_env(endpoint),
        capture_output=True,
        text=True,
        timeout=300,
    )


def files_under(root: pathlib.Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.name != COMPLETE_MARKER
    }


def test_s3_model_arrives_byte_equal_with_progress_while_it_downloads(endpoint, model_in_s3, tmp_path):
    dest, message = tmp_path / "model", tmp_path / "termination-log"
    p = fetch(endpoint, "s3://models/tiny", dest, "--progress-interval", "0.01", "--termination-message", str(message))
    assert p.returncode == 0, p.stderr
    assert files_under(dest) == model_in_s3  # the sibling prefix tiny2/ is not part of s3://models/tiny
    # what the cache Job leaves for the operator's fit check: the config's fit keys, for this URI
    config = json.loads(model_in_s3["config.json"])
    assert parse_config_report(message.read_text()) == ("s3://models/tiny", fit.fit_config(config))
    assert fit.fit_config(config)["num_hidden_layers"] == config["num_hidden_layers"]
    lines = [q for q in map(parse_progress_line, p.stdout.splitlines()) if q is not None]
    total = sum(map(len, model_in_s3.values()))
    final = lines[-1]
    assert (
        final.done
        and final.bytes == final.total_bytes == total
        and final.files == final.total_files == len(model_in_s3)
    )
    during = [q for q in lines if not q.done]
    assert during, f"no progress line before the end: {p.stdout[:500]}"
    assert all(q.total_bytes == total and 0 <= q.bytes <= total for q in during)
    assert [q.bytes for q in lines] == sorted(q.bytes for q in lines)  # never goes back
    assert any(0 < q.bytes < total for q in during)
    assert "%" in during[-1].summary() and final.summary().startswith("100% (")


def test_a_complete_copy_is_not_downloaded_again(endpoint, model_in_s3, tmp_path):
    dest = tmp_path / "model"
    assert fetch(endpoint, "s3://models/tiny", dest).returncode == 0
    s3 = s3_client(endpoint)
    s3.copy_object(
        Bucket="models", Key="tiny/extra/blob.bin.keep", CopySource={"Bucket": "models", "Key": "tiny/extra/blob.bin"}
    )
    s3.delete_object(Bucket="models", Key="tiny/extra/blob.bin")  # a download now would fail or differ
    message = tmp_path / "termination-log"
    try:
        again = fetch(endpoint, "s3://models/tiny", dest, "--termination-message", str(message))
    finally:
        s3.copy_object(
            Bucket="models",
            Key="tiny/extra/blob.bin",
            CopySource={"Bucket": "models", "Key": "tiny/extra/blob.bin.keep"},
        )
        s3.delete_object(Bucket="models", Key="tiny/extra/blob.bin.keep")
    assert again.returncode == 0, again.stderr
    said = last_progress(again.stdout)
    assert said is not None and said.cached and said.done
    assert parse_config_report(message.read_text())[0] == "s3://models/tiny"  # reported from the kept copy too
    assert files_under(dest) == model_in_s3


def test_wait_for_model_holds_until_the_copy_is_complete(endpoint, model_in_s3, tmp_path):
    dest = tmp_path / "model"
    wait = [sys.executable, "-m", "kubellm.cli", "wait-for-model", "s3://models/tiny", str(dest)]
    timed_out = subprocess.run([*wait, "--timeout", "1"], capture_output=True, text=True, timeout=60)
    assert timed_out.returncode == 1 and "not in" in timed_out.stdout
    waiting = subprocess.Popen(wait, stdout=subprocess.PIPE, text=True)
    try:
        assert fetch(endpoint, "s3://models/tiny", dest).returncode == 0
        out, _ = waiting.communicate(timeout=60)
    finally:
        waiting.kill()
    assert waiting.returncode == 0 and "is in" in out
    other = subprocess.run(
        [*wait[:-2], "s3://models/other", str(dest), "--timeout", "1"], capture_output=True, text=True
    )
    assert other.returncode == 1  # a copy of another URI does not count


@pytest.mark.parametrize(
    ("uri", "message"),
    [("s3://models/nothing-here", "no objects under s3://models/nothing-here/"), ("gs://b/m", "only hf:// and s3://")],
)
def test_bad_sources_fail_with_a_clear_message(endpoint, model_in_s3, tmp_path, uri, message):
    p = fetch(endpoint, uri, tmp_path / "model")
    assert p.returncode != 0 and message in p.stderr


def test_a_key_leading_outside_the_directory_is_refused(endpoint, tmp_path):
    s3 = s3_client(endpoint)
    s3.create_bucket(Bucket="evil")
    s3.put_object(Bucket="evil", Key="m/../../escaped.txt", Body=b"x")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="evil")["Contents"]]
    assert keys == ["m/../../escaped.txt"]  # the server keeps the key as sent: the downloader must refuse it
    p = fetch(endpoint, "s3://evil/m", tmp_path / "a" / "model")
    assert p.returncode != 0 and "leads outside" in p.stderr
    assert not list(tmp_path.rglob("escaped.txt"))


def test_hf_model_from_a_local_hub_arrives_with_its_progress(tmp_path):
    """hf:// through huggingface_hub against a local hub stand-in (tests/support/hub.py): the files the runtime
    reads arrive equal (others are not fetched), and the progress lines carry the hub's sizes."""
    from kubellm.weights.tiny import make_tiny_model
    from tests.support.hub import local_hub

    src = tmp_path / "src"
    make_tiny_model(str(src), "llama")
    (src / "notes.bin").write_bytes(b"not a weight format the runtime reads")
    wanted = {k: v for k, v in files_under(src).items() if not k.endswith(".bin")}
    with local_hub("org/tiny", src) as url:
        env = {**os.environ, "HF_ENDPOINT": url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
        p = subprocess.run(
            [sys.executable, "-m", "kubellm.cli", "fetch-model", "hf://org/tiny", str(tmp_path / "model")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert p.returncode == 0, p.stderr
    got = {k: v for k, v in files_under(tmp_path / "model").items() if not k.startswith(".cache/")}
    assert got == wanted
    final = last_progress(p.stdout)
    total = sum(map(len, wanted.values()))
    assert final.done and final.bytes == final.total_bytes == total and final.total_files == len(wanted)
