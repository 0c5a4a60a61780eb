"""Bounded readers for every text and byte format mgd3 takes from outside (configs, manifests,
model folders, class maps, eval records, Fashion-MNIST idx files): one place that refuses what
would hang, blow up or crash a parser, with a one-line `Mgd3Error` naming the file.

- Only regular files are opened: a FIFO (which would block `open` forever), a device
  (`/dev/zero`: endless bytes) or a folder is refused after `os.stat`, before opening; the file
  is then opened non-blocking and checked again (`fstat`), so a swap in between changes nothing.
- Bytes are bounded while reading, not by the size `stat` reports (`/proc` files say 0).
- Text must be UTF-8. JSON and YAML are bounded in nesting depth (`MAX_DEPTH`) and integer
  length (`MAX_INT_DIGITS`: far below Python's 4300-digit conversion limit), YAML also in alias
  expansion (a 500-byte "billion laughs" document is refused in milliseconds, before anything
  walks it) and self-reference.
- gzip is bounded in decompressed bytes (a 18 MB file can inflate to 4 GiB).

Imports nothing of mgd3 but `mgd3.errors`, so any stage can use it.
"""

from __future__ import annotations

import json
import os
import stat
import zlib
from typing import Any, Callable

from mgd3.errors import Mgd3Error

MAX_DEPTH = 100  # nesting of JSON/YAML containers: mgd3's own files nest fewer than 10 deep
MAX_INT_DIGITS = 100  # an integer literal longer than this is no count, size or seed
MAX_ALIAS_NODES = 100_000  # YAML nodes that aliases may add beyond those written out
MAX_JSON_BYTES = 64 << 20
MAX_TEXT_BYTES = 64 << 20


# --------------------------------------------------------------------------- bytes


def _reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def check_regular(path: str | os.PathLike, name: str | None = None) -> os.stat_result:
    """`os.stat` of a path that must be a regular file (symlinks followed); a missing path, a
    folder, a FIFO, a device or a socket is a one-line error. Nothing is opened."""
    name = name or str(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise Mgd3Error(f"{name} does not exist") from None
    except OSError as e:  # ELOOP, EACCES, ENAMETOOLONG, ...
        raise Mgd3Error(f"cannot read {name} ({_reason(e)})") from None
    if stat.S_ISDIR(st.st_mode):
        raise Mgd3Error(f"{name} is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise Mgd3Error(f"{name} is a {_kind(st.st_mode)}, not a regular file; mgd3 reads only regular files")
    return st


def open_regular(path: str | os.PathLike, name: str | None = None):
    """A binary file object of a regular file (see `check_regular`), opened without blocking."""
    name = name or str(path)
    check_regular(path, name)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise Mgd3Error(f"cannot read {name} ({_reason(e)})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # replaced between stat and open
            raise Mgd3Error(f"{name} is a {_kind(st.st_mode)}, not a regular file; mgd3 reads only regular files")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _size_text(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n} bytes"


READ_CHUNK = 1 << 20  # bytes per read while a bounded file is read


def read_bytes(path: str | os.PathLike, max_bytes: int, name: str | None = None, kind: str = "file") -> bytes:
    """At most `max_bytes` bytes of a regular file; a longer file is an error (the bound holds
    while reading, whatever `stat` says)."""
    name = name or str(path)
    chunks, n = [], 0
    with open_regular(path, name) as f:
        try:
            # in chunks: `read(max_bytes + 1)` would allocate the whole bound up front (a 1 GiB
            # buffer for a manifest), and the freed buffer changes how malloc serves the sampler
            while n <= max_bytes:
                chunk = f.read(min(READ_CHUNK, max_bytes + 1 - n))
                if not chunk:
                    break
                chunks.append(chunk)
                n += len(chunk)
        except OSError as e:
            raise Mgd3Error(f"cannot read {name} ({_reason(e)})") from None
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise Mgd3Error(f"{name} is larger than {_size_text(max_bytes)}; it is not a {kind}")
    return data


def decode_text(data: bytes, name: str, allow_nul: bool = False) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Mgd3Error(f"{name} is not a text (UTF-8) file (byte {e.start})") from None
    if not allow_nul and "\x00" in text:
        raise Mgd3Error(f"{name} is not a text (UTF-8) file (it holds NUL bytes)")
    return text.removeprefix("\ufeff")


def read_text(path: str | os.PathLike, max_bytes: int = MAX_TEXT_BYTES, name: str | None = None,
              kind: str = "text file") -> str:
    """A bounded, UTF-8, NUL-free text file."""
    name = name or str(path)
    return decode_text(read_bytes(path, max_bytes, name, kind), name)


def read_gzip(path: str | os.PathLike, max_bytes: int, name: str | None = None, kind: str = "file") -> bytes:
    """The decompressed bytes of a gzip file, refused once they pass `max_bytes` (a gzip bomb is
    stopped after `max_bytes`, not after it filled the memory)."""
    import gzip

    name = name or str(path)
    with open_regular(path, name) as raw:
        try:
            with gzip.GzipFile(fileobj=raw, mode="rb") as f:
                chunks, n = [], 0
                while n <= max_bytes:  # in chunks, as read_bytes
                    chunk = f.read(min(READ_CHUNK, max_bytes + 1 - n))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    n += len(chunk)
                data = b"".join(chunks)
        except (OSError, EOFError, zlib.error) as e:
            raise Mgd3Error(f"{name} is corrupt or truncated, not a valid gzip file ({e})") from None
    if len(data) > max_bytes:
        raise Mgd3Error(f"{name} inflates to more than {_size_text(max_bytes)}; it is not a {kind}")
    return data


# --------------------------------------------------------------------------- tensors


def view_problem(t) -> str | None:
    """Why a tensor loaded from a file (`torch.load(weights_only=True)`) is not plain data: a view
    that claims more elements than its stored bytes hold (a stride-0 broadcast: 1.7 KB on disk
    that `.float()` or `.contiguous()` would turn into 100 GB), or None. Checked before anything
    materialises it."""
    numel = t.numel()
    stored = t.untyped_storage().nbytes() // max(1, t.element_size())
    if numel > stored or any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
        return (f"holds a view of {numel} elements over {stored} stored ones (shape {tuple(t.shape)}, stride "
                f"{tuple(t.stride())}); mgd3 writes plain tensors")
    return None


def load_error(e: BaseException) -> str:
    """One line for why `torch.load(weights_only=True)` refused a file, without torch's advice to
    load it with the weights-only check turned off (the unsafe action)."""
    text = str(e).strip()
    if "Weights only load failed" in text or "weights_only" in text:
        m = next((ln.strip() for ln in text.splitlines() if ln.strip().startswith(("WeightsUnpickler error",
                                                                                   "Unsupported global"))), "")
        return ("it holds Python objects beyond plain tensors, which mgd3 never unpickles"
                + (f": {m[:160]}" if m else ""))
    return " ".join(text.splitlines()[0].split())[:160] if text else type(e).__name__


# --------------------------------------------------------------------------- JSON


class _Limit(Exception):
    """A parsed document passed a bound (turned into Mgd3Error with the file's name)."""


def _bounded_int(s: str) -> int:
    digits = len(s.lstrip("+-"))
    if digits > MAX_INT_DIGITS:
        raise _Limit(f"holds an integer of {digits} digits (at most {MAX_INT_DIGITS})")
    return int(s)


def _depth_ok(obj: Any) -> None:
    """Refuse containers nested more than MAX_DEPTH deep (iterative: no recursion to overflow)."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict):
            children = o.values()
        elif isinstance(o, (list, tuple)):
            children = o
        else:
            continue
        if d > MAX_DEPTH:
            raise _Limit(f"is nested more than {MAX_DEPTH} levels deep")
        stack.extend((c, d + 1) for c in children)


def loads_json(text: str | bytes, name: str, object_pairs_hook: Callable | None = None,
               syntax_errors: bool = False) -> Any:
    """JSON text -> value, bounded in nesting and integer length; one-line errors naming `name`
    (with `syntax_errors`, invalid JSON stays a `json.JSONDecodeError` for the caller to word)."""
    if isinstance(text, bytes):
        text = decode_text(text, name, allow_nul=True)
    try:
        obj = json.loads(text, parse_int=_bounded_int, object_pairs_hook=object_pairs_hook)
        _depth_ok(obj)
    except _Limit as e:
        raise Mgd3Error(f"{name} {e}") from None
    except json.JSONDecodeError as e:
        if syntax_errors:
            raise
        raise Mgd3Error(f"{name} is not valid JSON ({e.msg}, line {e.lineno})") from None
    except RecursionError:
        raise Mgd3Error(f"{name} is nested too deeply (more than {MAX_DEPTH} levels)") from None
    except ValueError as e:  # a number Python will not convert
        raise Mgd3Error(f"{name} is not valid JSON ({' '.join(str(e).split())[:120]})") from None
    return obj


def read_json(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES, name: str | None = None,
              kind: str = "JSON file", object_pairs_hook: Callable | None = None) -> Any:
    name = name or str(path)
    return loads_json(decode_text(read_bytes(path, max_bytes, name, kind), name), name, object_pairs_hook)


def read_json_object(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES, name: str | None = None,
                     kind: str = "JSON file") -> dict:
    name = name or str(path)
    d = read_json(path, max_bytes, name, kind)
    if not isinstance(d, dict):
        raise Mgd3Error(f"{name} must hold a JSON object, not a {type(d).__name__}")
    return d


# --------------------------------------------------------------------------- YAML


def _bounded_loader():
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        """yaml.SafeLoader with bounded nesting, integer length and alias expansion."""

        _depth = 0

        def compose_node(self, parent, index):
            self._depth += 1
            try:
                if self._depth > MAX_DEPTH:
                    raise _Limit(f"is nested more than {MAX_DEPTH} levels deep")
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

        def get_single_node(self):
            node = super().get_single_node()
            if node is not None:
                _aliases_ok(node)
            return node

        def construct_yaml_int(self, node):
            digits = len(str(node.value).replace("_", "").lstrip("+-"))
            if digits > MAX_INT_DIGITS:
                raise _Limit(f"holds an integer of {digits} digits (at most {MAX_INT_DIGITS})")
            return super().construct_yaml_int(node)

    BoundedLoader.add_constructor("tag:yaml.org,2002:int", BoundedLoader.construct_yaml_int)
    return BoundedLoader


def _aliases_ok(root) -> None:
    """The node graph as the constructor will walk it: refuse a document whose aliases add more
    than MAX_ALIAS_NODES nodes, or that contains itself. Sizes are memoised per node, so an
    exponential "billion laughs" costs one pass over the nodes actually written."""
    import yaml

    size: dict[int, int] = {}
    open_: set[int] = set()
    unique = 0
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if isinstance(node, yaml.ScalarNode):
            if key not in size:
                size[key] = 1
                unique += 1
            continue
        if node.value is None:
            continue
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else node.value
        if done:
            open_.discard(key)
            size[key] = min(1 + sum(size.get(id(c), 1) for c in children), 1 << 62)
            continue
        if key in size:
            continue
        if key in open_:
            raise _Limit("refers to itself through an alias")
        open_.add(key)
        unique += 1
        stack.append((node, True))
        stack.extend((c, False) for c in children)
    if size.get(id(root), 0) > unique + MAX_ALIAS_NODES:
        raise _Limit(f"expands through its aliases to more than {MAX_ALIAS_NODES} extra values")


_LOADER = None


def loads_yaml(text: str, name: str) -> Any:
    """YAML text -> value, like `yaml.safe_load` but bounded; a bound broken is an `Mgd3Error`
    naming `name`; a syntax error stays a `yaml.YAMLError` (callers decide what it means)."""
    import yaml

    global _LOADER
    if _LOADER is None:
        _LOADER = _bounded_loader()
    loader = _LOADER(text)
    try:
        return loader.get_single_data()
    except _Limit as e:
        raise Mgd3Error(f"{name} {e}") from None
    except RecursionError:
        raise Mgd3Error(f"{name} is nested too deeply (more than {MAX_DEPTH} levels)") from None
    except ValueError as e:  # a number Python will not convert
        raise yaml.YAMLError(" ".join(str(e).split())[:120]) from None
    finally:
        loader.dispose()


def read_yaml(path: str | os.PathLike, max_bytes: int = 1 << 20, name: str | None = None,
              kind: str = "YAML file") -> Any:
    """A bounded YAML file -> value; every failure (including invalid YAML) is one line."""
    import yaml

    name = name or str(path)
    text = decode_text(read_bytes(path, max_bytes, name, kind), name)
    try:
        return loads_yaml(text, name)
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Mgd3Error(f"{name} is not valid YAML ({first})") from None
