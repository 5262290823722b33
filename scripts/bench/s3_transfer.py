"""The raw tool's side of an object-store benchmark: one file uploaded with boto3's managed transfer
(multipart, 8 MiB parts, 4 at once: what `aws s3 cp` does) or downloaded (ranged GETs, 4 at once).

    s3_transfer.py up FILE BUCKET KEY
    s3_transfer.py down BUCKET KEY FILE

The endpoint and credentials come from the AWS_* environment variables (AWS_ENDPOINT_URL included).
"""
import sys

import boto3
from boto3.s3.transfer import TransferConfig

CONFIG = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20, max_concurrency=4)


def main():
    s3 = boto3.client("s3")
    if sys.argv[1] == "up":
        s3.upload_file(sys.argv[2], sys.argv[3], sys.argv[4], Config=CONFIG)
    elif sys.argv[1] == "down":
        s3.download_file(sys.argv[2], sys.argv[3], sys.argv[4], Config=CONFIG)
    else:
        sys.exit(f"usage: {sys.argv[0]} up FILE BUCKET KEY | down BUCKET KEY FILE")


if __name__ == "__main__":
    main()
