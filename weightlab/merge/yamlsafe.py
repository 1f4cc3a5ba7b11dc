"""Reading a YAML config safely: one parse, duplicate keys refused, the expanded size bounded.

PyYAML keeps the last of two equal keys silently, and aliases let ~1 KB of text expand into
billions of nodes ("billion laughs") that anything walking the loaded data (validation, the recipe
hash) would traverse. So the composed node graph is checked first, once per node (memoised by
identity, aliases are shared nodes): equal keys in one mapping are an error naming both lines, a
recursive alias is an error, and the size the data would have once expanded is counted and refused
above :data:`MAX_NODES`. Only then is the Python data constructed. Errors name ``source:line``.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable

from ..errors import MergeError

__all__ = ["MAX_NODES", "load", "line", "child", "item", "key_line", "fail", "check_keys"]

#: The most nodes (scalars, lists, mappings, keys) a config may have once its aliases are expanded.
MAX_NODES = 100_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


def fail(source: str, node, msg: str, default: int = 1):
    """Raise a :class:`MergeError` ``source:line: msg`` (the node's line)."""
    raise MergeError(f"{source}:{line(node, default)}: {msg}")


def line(node, default: int = 1) -> int:
    mark = getattr(node, "start_mark", None)
    return mark.line + 1 if mark is not None else default


def _pairs(node):
    import yaml

    return node.value if isinstance(node, yaml.MappingNode) else ()


def child(node, key):
    """The value node of ``key`` in a mapping node (the last one, as the constructed data), or None."""
    found = None
    for k, v in _pairs(node):
        if getattr(k, "value", None) == key:
            found = v
    return found


def key_line(node, key, default: int | None = None) -> int:
    """The line of ``key`` in a mapping node (else the mapping's own line)."""
    for k, _ in _pairs(node):
        if getattr(k, "value", None) == str(key):
            return line(k)
    return default if default is not None else line(node)


def item(node, i: int):
    """Item ``i`` of a sequence node, or the node itself when it is not one."""
    import yaml

    if isinstance(node, yaml.SequenceNode) and i < len(node.value):
        return node.value[i]
    return node


def check_keys(source: str, data: dict, node, allowed: Iterable[str], what: str,
               later: dict[str, str] | None = None) -> None:
    """Every key of ``data`` must be in ``allowed``; a key of ``later`` (mergekit knows it, we do not
    support it yet) is refused with its reason; anything else gets a did-you-mean suggestion."""
    allowed, later = list(allowed), later or {}
    for k in data:
        if k in allowed:
            continue
        where = f"{source}:{key_line(node, k)}"
        if k in later:
            raise MergeError(f"{where}: '{k}' in {what} is not supported yet ({later[k]})")
        close = difflib.get_close_matches(str(k), allowed + list(later), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise MergeError(f"{where}: unknown key {k!r} in {what}{hint}; allowed: {', '.join(allowed)}")


def _check_graph(root, source: str) -> None:
    """Duplicate keys, recursive aliases and the expanded size, over the composed graph (each node
    visited once)."""
    import yaml

    size: dict[int, int] = {}
    active: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        nid = id(node)
        if done:
            active.discard(nid)
            kids = _children(node)
            total = 1 + sum(size[id(c)] for c in kids)
            size[nid] = total
            if total > MAX_NODES:
                big = node
                while True:  # point at the innermost node that alone is too big
                    inner = [c for c in _children(big) if size.get(id(c), 0) > MAX_NODES]
                    if not inner:
                        break
                    big = inner[0]
                raise MergeError(f"{source}:{line(big)}: the config expands to more than {MAX_NODES} YAML nodes "
                                 "(nested aliases?); refusing to load it")
            continue
        if nid in size:
            continue
        if nid in active:
            fail(source, node, "recursive YAML alias (a node that contains itself)")
        active.add(nid)
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for k, _ in node.value:
                if isinstance(k, yaml.ScalarNode) and k.tag != _MERGE_TAG:
                    ident = (k.tag, k.value)
                    if ident in seen:
                        raise MergeError(f"{source}:{line(k)}: duplicate key {k.value!r} (first at line {seen[ident]}; "
                                         "YAML would silently keep only the last)")
                    seen[ident] = line(k)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in size)


def _children(node) -> list:
    import yaml

    if isinstance(node, yaml.MappingNode):
        return [x for pair in node.value for x in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def load(text: str, source: str) -> tuple[Any, Any]:
    """``(root node, data)`` of one YAML document, checked as the module docstring says."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            raise MergeError(f"{source}:1: empty config (expected a mapping with merge_method, models ...)")
        _check_graph(root, source)
        return root, loader.construct_document(root)
    except MergeError:
        raise
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = mark.line + 1 if mark is not None else 1
        msg = " ".join(str(e).split())
        raise MergeError(f"{source}:{where}: unreadable YAML: {msg}") from None
    except RecursionError:
        raise MergeError(f"{source}:1: the YAML is nested too deeply") from None
    except (ValueError, TypeError, OverflowError) as e:  # explicit tags on bad scalars: !!int x, !!float y
        raise MergeError(f"{source}:1: unreadable YAML: {e}") from None
    finally:
        loader.dispose()
