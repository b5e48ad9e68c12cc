"""fetch_model: download a model (hf://org/name[@revision] or s3://bucket/prefix) into a directory; the
operator's init container runs this before `kubellm serve`."""

from __future__ import annotations

import os


def fetch_model(uri: str, dest: str) -> str:
    scheme, _, rest = uri.partition("://")
    os.makedirs(dest, exist_ok=True)
    if scheme == "hf":
        from huggingface_hub import snapshot_download

        repo, _, revision = rest.partition("@")
        return snapshot_download(
            repo_id=repo,
            revision=revision or None,
            local_dir=dest,
            token=os.environ.get("HF_TOKEN"),
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
        )
    if scheme == "s3":
        try:
            import boto3
        except ImportError:
            raise SystemExit("s3:// models need boto3 in the runtime image (pip install boto3)") from None
        bucket, _, prefix = rest.partition("/")
        s3 = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = os.path.relpath(obj["Key"], prefix) if prefix else obj["Key"]
                target = os.path.join(dest, rel)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                s3.download_file(bucket, obj["Key"], target)
        return dest
    raise SystemExit(f"cannot fetch {uri!r}: only hf:// and s3:// are downloaded (pvc:// is mounted)")
