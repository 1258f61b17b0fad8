"""`s3://` objects: whole shards read by DALI's own S3 reader (AWS SDK for C++ inside DALI 2.4, CPU build
included) for the DALI loader, by boto3 for the DALI-free loader and for dataset.json.

Both clients take the standard AWS configuration, nothing project-specific:
  AWS_ENDPOINT_URL (an S3-compatible server such as MinIO; unset = AWS), AWS_ACCESS_KEY_ID,
  AWS_SECRET_ACCESS_KEY (or AWS_PROFILE / ~/.aws/credentials / an instance role), AWS_REGION and
  AWS_DEFAULT_REGION (boto3 reads the latter).
"""
from __future__ import annotations

import os

import numpy as np

__all__ = ["S3AccessError", "is_s3", "split_s3_url", "read_s3_object", "read_s3_objects_with_dali", "S3_HELP"]

S3_HELP = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), AWS_REGION and AWS_DEFAULT_REGION, "
           "and AWS_ENDPOINT_URL=http(s)://host:port for an S3-compatible server (leave it unset for AWS)")


class S3AccessError(RuntimeError):
    """An `s3://` object could not be read for a reason the user must fix (credentials, endpoint, bucket)."""


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def split_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/a/b.tar` -> ("bucket", "a/b.tar")."""
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket or not key:
        raise ValueError(f"{url!r} is not an s3://BUCKET/KEY URL")
    return bucket, key


_CLIENTS: dict[tuple, object] = {}
_CLIENT_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION")


def _client():
    """One boto3 client per process and AWS configuration (DataLoader workers are forked, and a client must
    not cross a fork; a changed AWS_* variable takes effect at the next read)."""
    cache_key = (os.getpid(), *(os.environ.get(name) for name in _CLIENT_ENV))
    if cache_key not in _CLIENTS:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise S3AccessError("reading s3:// needs boto3 (pip install boto3)") from None
        config = Config(connect_timeout=10, read_timeout=60, retries={"max_attempts": 3})
        _CLIENTS.clear()
        # a new session: boto3's default one keeps the credentials it resolved first
        _CLIENTS[cache_key] = boto3.session.Session().client("s3", config=config)
    return _CLIENTS[cache_key]


def read_s3_object(url: str) -> bytes:
    """The whole object; missing credentials, an unreachable endpoint or a missing object raise
    S3AccessError / FileNotFoundError naming the URL and what to set."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, NoRegionError

    bucket, key = split_s3_url(url)
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "AWS's default endpoint")
    try:
        return _client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except (NoCredentialsError, NoRegionError) as error:
        raise S3AccessError(f"cannot read {url}: {error}; {S3_HELP}") from None
    except EndpointConnectionError as error:
        raise S3AccessError(f"cannot read {url}: {endpoint} does not answer ({error}); {S3_HELP}") from None
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NoSuchBucket"):
            raise FileNotFoundError(f"{url} does not exist on {endpoint} ({code})") from None
        raise S3AccessError(f"cannot read {url} from {endpoint}: {error}; {S3_HELP}") from None


def read_s3_objects_with_dali(urls: list[str]) -> list[bytes]:
    """Whole objects read by DALI's native S3 reader (`fn.readers.file` with s3:// files), in one batch.

    DALI reads AWS_ENDPOINT_URL and the AWS SDK's credential chain itself. Note: the S3 requests are made
    while DALI holds the Python GIL, so an S3 server running as a thread of this same Python process
    (moto's ThreadedMotoServer) cannot answer them; run such a server as its own process."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=len(urls), num_threads=1, device_id=None, prefetch_queue_depth=1)
    def _whole_objects():
        data, _label = fn.readers.file(files=list(urls), lazy_init=True)
        return data

    pipe = _whole_objects()
    try:
        pipe.build()
        (out,) = pipe.run()
    except RuntimeError as error:
        lines = [line for line in str(error).splitlines() if "S3" in line or "curl" in line] or [str(error)]
        raise S3AccessError(f"DALI could not read {', '.join(urls)}: {' '.join(lines)}; {S3_HELP}") from None
    finally:
        del pipe
    return [np.asarray(out[i]).tobytes() for i in range(len(urls))]
