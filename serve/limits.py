"""The server's default limits, in one import-free module (the command line reads them without
loading the server). Most are flags of `xlaserve serve`."""

MAX_OPEN_STREAMS = 64  # open health Watch and reflection streams (no key needed): --max-open-streams
MAX_SCORE_ITEMS = 256  # items of one Score request: --max-score-items
WORKER_THREADS = 8  # threads that tokenize and build requests off the event loop: --worker-threads
MAX_MESSAGE_BYTES = 16 << 20  # largest request or response message: --max-message-bytes
MAX_REQUEST_ID = 128  # characters of a client-chosen request_id (it is echoed back)
MAX_CHOICES = 128  # samples of one request (gRPC n; HTTP n x prompts)


def most_choices(max_slots: int, max_queue: int) -> int:
    """Samples one request may ask for: all of them must be admitted at once."""
    return min(MAX_CHOICES, max_slots + max_queue)
