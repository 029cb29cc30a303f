"""A verifier back on the broker after losing it writes again the output chunks the broker lacks (a transaction
cut off by the lost connection, or chunks a failed-over master had not passed on to its replica): once, and so
that a reader who saw the lost chunks and one who did not both end up with the same tokens and text."""

from __future__ import annotations

from types import SimpleNamespace

from cosine.broker import RedisSettings, Streams, connect
from cosine.client import _Assembler
from cosine.keys import Keys
from cosine.local_redis import LocalRedis
from cosine.protocol import Chunk, decode_entry
from cosine.service.output import OutputWriter
from cosine.service.request_state import OutputCursor


class Letters:
    """A tokenizer stand-in: token t is the letter chr(97 + t)."""

    @staticmethod
    def decode(ids):
        return "".join(chr(97 + t) for t in ids)


def chunk(seq: int, offset: int, tokens: list[int]) -> Chunk:
    return Chunk("r1", seq, offset, tokens, Letters.decode(tokens), False, None, None, None, verifier="v")


def test_lost_chunks_are_written_again_once_and_read_right_either_way():
    with LocalRedis() as srv:
        streams = Streams(connect(RedisSettings(url=srv.url)), Keys("t"))
        writer = OutputWriter(streams, Letters(), 100, "v")
        written = [chunk(0, 0, [0, 1, 2]), chunk(1, 3, [3, 4]), chunk(2, 5, [5, 6])]
        pipe = streams.transaction()
        streams.add_output(pipe, written[0])  # chunks 1 and 2 never reached this broker
        pipe.execute()
        cursor = OutputCursor(chunk_seq=3, sent=7)
        cursor.text.emitted = 7
        seq = SimpleNamespace(output_ids=list(range(7)), finished=False, params=SimpleNamespace(stop=()))
        st = SimpleNamespace(rid="r1", output=cursor, seq=seq, msg=SimpleNamespace(owner=None))
        for expected in (1, 0):  # the second time nothing is missing any more
            pipe = streams.transaction()
            assert writer.resync(pipe, [st]) == expected
            pipe.execute()
        rows = streams.entries(streams.keys.out("r1"))
        assert writer.recover(rows).tokens == list(range(7))
        stored = [decode_entry(f, (Chunk,), 100) for _, f in rows]
        later = chunk(3, 7, [7])  # the verifier goes on after the resync
        for seen in (written[:1], written):  # a reader who missed the lost chunks, and one who saw them
            reader = _Assembler("r1")
            for ch in seen + stored[1:] + [later]:  # then what the broker holds after the first chunk
                reader.add(ch)
            assert reader.tokens == list(range(8)) and "".join(reader.text) == "abcdefgh"
