"""Silencing libraries that print to stdout (Torch-Pruning, onnxslim), which carries results, or log notes a user
cannot act on (ONNX Runtime's quantizer, Inductor's C++ build)."""
import contextlib
import io
import logging


def quiet_stdout():
    return contextlib.redirect_stdout(io.StringIO())


@contextlib.contextmanager
def quiet_logger(name: str, level: int = logging.ERROR):
    """The logger `name` passes only records of `level` and above while inside; its own level is restored on exit."""
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)
