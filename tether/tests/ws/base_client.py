"""A foreign stable-conduit client: Python `websockets` speaking tether's
base format (docs/PROTOCOL.md sections 2 to 4, no extensions) by hand.

Usage: base_client.py PORT [N]

Connects to ws://127.0.0.1:PORT/, sends a new-session ClientHello, checks
the ServerHello, sends N data frames whose items are the postcard encoding
of the Rust test's message type (u32, u64, Vec<u8>) = (7, i, b"python i x..."),
then reads N echoes (7, i, b"echo:" + the same bytes) and checks each one's
seq and content. Prints "ok N echoes" on success; any mismatch raises.
"""

import asyncio
import sys

from websockets.asyncio.client import connect

HELLO_LEN = 25


def varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_varint(buf, i):
    value, shift = 0, 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def item(stream, idx, data):
    """postcard of (u32, u64, Vec<u8>): varint, varint, varint length, bytes."""
    return varint(stream) + varint(idx) + varint(len(data)) + data


def payload(i):
    return f"python {i} {'x' * (i * 37)}".encode()


async def main(port, n):
    url = f"ws://127.0.0.1:{port}/"
    async with connect(url, compression=None, max_size=1 << 20) as ws:
        # ClientHello: magic ROCH, flags 0 (new session, no extensions),
        # no resume key, no last received.
        hello = b"ROCH" + bytes([0]) + bytes(16) + bytes(4)
        assert len(hello) == HELLO_LEN
        await ws.send(hello)
        server_hello = await ws.recv()
        assert isinstance(server_hello, bytes), "binary messages only"
        assert len(server_hello) == HELLO_LEN, server_hello
        assert server_hello[:4] == b"ROSH", server_hello
        flags = server_hello[4]
        assert flags & 0x01 == 0, "not rejected"
        assert flags & 0xFC == 0, "no extension is on"

        # Data frames: seq 0.. , ack tag 00 (no ack), then the item.
        for i in range(n):
            await ws.send(varint(i) + b"\x00" + item(7, i, payload(i)))

        for expected in range(n):
            frame = await ws.recv()
            assert isinstance(frame, bytes)
            seq, j = read_varint(frame, 0)
            tag = frame[j]
            j += 1
            if tag == 0x01:
                ack, j = read_varint(frame, j)
                assert ack < n, ack
            elif tag != 0x00:
                raise AssertionError(f"unexpected tag {tag:#x}")
            assert seq == expected, (seq, expected)
            stream, j = read_varint(frame, j)
            idx, j = read_varint(frame, j)
            length, j = read_varint(frame, j)
            data = frame[j : j + length]
            assert j + length == len(frame), "trailing bytes"
            assert (stream, idx) == (7, expected), (stream, idx)
            assert data == b"echo:" + payload(expected), data[:40]
    print(f"ok {n} echoes")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 10))
