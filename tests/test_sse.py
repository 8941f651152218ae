"""
SSE framing and NDJSON splitting: pure functions.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from chatterd import sse
from tests.phone import read_as_phone


def sse_events(stream: bytes) -> tuple[list[tuple[str, bytes]], int]:
    """
    Parse ``stream`` by the SSE rules (WHATWG HTML, "Interpreting an event
    stream"): the events it dispatches as ``(type, data)``, and how many
    comment lines it holds.
    """
    events: list[tuple[str, bytes]] = []
    comments, event, data = 0, b"", []
    for line in stream.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")[:-1]:
        if line == b"":  # dispatch, if there is data
            if data:
                events.append(((event or b"message").decode(), b"\n".join(data)))
            event, data = b"", []
        elif line.startswith(b":"):
            comments += 1
        else:
            name, _, value = line.partition(b":")
            value = value[1:] if value.startswith(b" ") else value
            if name == b"event":
                event = value
            elif name == b"data":
                data.append(value)
    return events, comments


class FrameTests(SynchronousTestCase):
    def test_data_frame_keeps_the_line(self) -> None:
        """
        A data frame is ``data: `` + the line unchanged + a blank line.
        """
        line = b'{"model":"m","message":{"role":"assistant","content":"Hi"},"done":false}'
        self.assertEqual(sse.data_frame(line), b"data: " + line + b"\n\n")

    def test_error_frame(self) -> None:
        """
        An error frame is an ``event: error`` line, a JSON ``data:`` line, a blank line.
        """
        self.assertEqual(
            sse.error_frame("model 'x' not found"),
            b'event: error\ndata: {"error": "model \'x\' not found"}\n\n',
        )

    def test_error_frame_stays_on_one_line(self) -> None:
        """
        Newlines and carriage returns in a message cannot break the frame.
        """
        frame = sse.error_frame("a\nb\rc\r\nd")
        self.assertEqual(frame.count(b"\n"), 3)
        self.assertNotIn(b"\r", frame)

    def test_heartbeat_is_a_comment(self) -> None:
        """
        By the SSE parsing rules the heartbeat is only comment lines and the
        blank line that ends them: it dispatches no event.  Between frames the
        phone's parser counts it as a comment and shows nothing for it.
        """
        self.assertEqual(sse_events(sse.HEARTBEAT), ([], 1))
        self.assertTrue(sse.HEARTBEAT.endswith(b"\n\n"))  # the next frame starts on a line of its own
        line = b'{"model":"m","message":{"role":"assistant","content":"Hi"},"done":false}'
        frame = sse.data_frame(line)
        self.assertEqual(sse_events(sse.HEARTBEAT + frame + sse.HEARTBEAT + frame), ([("message", line)] * 2, 2))
        view = read_as_phone(sse.HEARTBEAT + frame + sse.HEARTBEAT + sse.HEARTBEAT + frame)
        self.assertEqual((view.comments, view.bubble, view.errors, len(view.chunks)), (3, "HiHi", [], 2))
        self.assertEqual(read_as_phone(sse.HEARTBEAT).comments, 1)


class LineSplitterTests(SynchronousTestCase):
    def test_partial_lines_wait_for_their_end(self) -> None:
        """
        A line split across reads comes out whole, once.
        """
        s = sse.LineSplitter()
        self.assertEqual(s.feed(b'{"a":'), [])
        self.assertEqual(s.feed(b"1}"), [])
        self.assertEqual(s.feed(b"\n"), [b'{"a":1}'])

    def test_several_lines_in_one_read(self) -> None:
        """
        One read holding several lines gives each one, in order.
        """
        s = sse.LineSplitter()
        self.assertEqual(s.feed(b"one\ntwo\nthr"), [b"one", b"two"])
        self.assertEqual(s.feed(b"ee\n"), [b"three"])

    def test_crlf_and_blank_lines(self) -> None:
        """
        ``\\r\\n`` endings are stripped and blank lines dropped.
        """
        s = sse.LineSplitter()
        self.assertEqual(s.feed(b"a\r\n\r\n\nb\n"), [b"a", b"b"])

    def test_every_byte_split(self) -> None:
        """
        Feeding one byte at a time gives the same lines as feeding all at once.
        """
        data = b'{"x":1}\n{"y":"\\u00e9"}\n\n{"z":[1,2]}\n'
        s = sse.LineSplitter()
        out: list[bytes] = []
        for i in range(len(data)):
            out += s.feed(data[i : i + 1])
        self.assertEqual(out, sse.LineSplitter().feed(data))
        self.assertEqual(len(out), 3)

    def test_flush_returns_an_unterminated_last_line(self) -> None:
        """
        A body that does not end in a newline still yields its last line.
        """
        s = sse.LineSplitter()
        self.assertEqual(s.feed(b'{"done":true}'), [])
        self.assertEqual(s.flush(), b'{"done":true}')
        self.assertEqual(s.flush(), b"")

    def test_flush_of_blank_remainder(self) -> None:
        """
        Whitespace left over is not a line.
        """
        s = sse.LineSplitter()
        s.feed(b"a\n \r")
        self.assertEqual(s.flush(), b"")

    def test_a_line_too_long_is_refused(self) -> None:
        """
        A line over the limit raises instead of growing the buffer, whether
        it arrives whole or in pieces.
        """
        s = sse.LineSplitter(max_line=8)
        self.assertEqual(s.feed(b"12345678\n"), [b"12345678"])
        self.assertRaises(sse.LineTooLong, s.feed, b"123456789\n")
        s = sse.LineSplitter(max_line=8)
        s.feed(b"12345")
        self.assertRaises(sse.LineTooLong, s.feed, b"6789")
