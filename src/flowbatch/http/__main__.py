"""``python -m flowbatch.http module:attr``: the same as ``flowbatch serve``."""

from .cli import serve

if __name__ == "__main__":
    serve(prog_name="flowbatch serve")
