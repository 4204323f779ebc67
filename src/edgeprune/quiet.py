"""Silencing libraries that print to stdout (Torch-Pruning, onnxslim), which carries results."""
import contextlib
import io


def quiet_stdout():
    return contextlib.redirect_stdout(io.StringIO())
