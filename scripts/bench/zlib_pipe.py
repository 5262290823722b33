#!/usr/bin/env python3
"""zlib from stdin to stdout, as the codec alone for the zlib benchmarks (there is no standard zlib command):
`-1` compresses at level 1, `-d` decompresses. Uses the system's zlib through Python's module, 1 MiB at a time."""
import sys
import zlib

PIECE = 1 << 20


def main() -> None:
    src, dst = sys.stdin.buffer, sys.stdout.buffer
    if sys.argv[1:] == ["-d"]:
        codec = zlib.decompressobj()
        step, end = codec.decompress, codec.flush
    elif sys.argv[1:] == ["-1"]:
        codec = zlib.compressobj(1)
        step, end = codec.compress, codec.flush
    else:
        sys.exit("usage: zlib_pipe.py -1|-d <in >out")
    while piece := src.read(PIECE):
        dst.write(step(piece))
    dst.write(end())
    if sys.argv[1:] == ["-d"] and not codec.eof:
        sys.exit("zlib_pipe.py: the stream is cut short")


if __name__ == "__main__":
    main()
