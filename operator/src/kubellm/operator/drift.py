"""Pure: did another writer change a child the operator applied? (drift, R25)

The rule, read off `metadata.managedFields` as the API server writes them (checked on a real
control plane: kubectl scale, patch, edit, annotate, rollout restart, delete, and
kube-controller-manager):

- A field the LLMServer declares (in the rendered manifest) but that the operator's own
  server-side-apply entry (manager `kubellm-operator`, operation Apply) does not own was taken or
  removed by someone else: an Update (`kubectl edit`/`patch`, client-side `kubectl apply`) or a
  `kubectl scale` (subresource `scale`) that changes a value moves its ownership to that writer;
  a removal leaves it owned by nobody. A field two appliers both set to the same value stays
  ours too (shared ownership), so it is no drift.
- A field under `spec` that the LLMServer does not declare, owned by another manager through the
  main resource or `scale`, was added by someone else (an extra env var, a pod template
  annotation, `publishNotReadyAddresses` on a Service).
- Everything else is left alone: `status` and other subresources (kube-controller-manager writes
  status and, through `status`, the Deployment's `deployment.kubernetes.io/revision`
  annotation), and metadata that the LLMServer does not declare (`kubectl annotate` or `label`
  of the child object itself). So is `kubectl rollout restart` (`ALLOWED_ADDITIONS`).

Restoring is a forced server-side apply of the manifest (it takes declared fields back) plus,
for additions, a JSON patch that removes them (`removal_patch`). Afterwards the operator owns
every declared field and no other manager owns anything under `spec` (but allowed additions),
so the rule finds nothing and the operator does not write again.

Paths are tuples of managedFields keys: `f:<field>`, `k:<json>` (list element by key),
`v:<json>` (set element), `i:<index>`; `field_name` turns one into `spec.replicas`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from typing import Any

JSON = Mapping[str, Any]
Path = tuple[str, ...]

OUR_SUBRESOURCES = ("", "scale")
"""managedFields subresources through which another writer changes what the operator applies."""

ALLOWED_ADDITIONS: tuple[Path, ...] = (
    (
        "f:spec",
        "f:template",
        "f:metadata",
        "f:annotations",
        "f:kubectl.kubernetes.io/restartedAt",
    ),
)
"""Fields others may add: `kubectl rollout restart` asks for new pods, it is no drift (undoing
it would roll the pods a second time, back to the old template)."""


@dataclasses.dataclass(frozen=True)
class Change:
    """One field that another writer changed."""

    path: Path
    """managedFields keys from the object's root, e.g. ("f:spec", "f:replicas")."""
    manager: str | None
    """The field manager that owns it now; None when nobody does (the field was removed)."""
    added: bool
    """True: the LLMServer does not declare this field (another writer added it)."""


def find_drift(manifest: JSON, live: JSON, field_manager: str) -> list[Change]:
    """The fields of `live` that differ in ownership from what applying `manifest` gives.

    `manifest` is exactly what the operator applies (with `field_manager`, forced); `live` is the
    object as read from the API server, managedFields included. Empty: no drift.
    """
    entries = live.get("metadata", {}).get("managedFields") or []
    ours = _merged(e for e in entries if _is_ours(e, field_manager))
    if not ours:
        return [Change((), None, added=False)]  # never applied by the operator: apply it
    foreign = [e for e in entries if _is_foreign(e, field_manager)]
    changes = [
        Change(path, _owner_of(path, foreign), added=False) for path in _unowned(manifest, ours, ())
    ]
    for entry in foreign:
        spec_fields = (entry.get("fieldsV1") or {}).get("f:spec")
        if not isinstance(spec_fields, dict):
            continue
        for path in _leaves(spec_fields, ("f:spec",)):
            if locate(manifest, path) is None and not _allowed(path):
                changes.append(Change(path, str(entry.get("manager")), added=True))
    return _outermost(changes)


def _allowed(path: Path) -> bool:
    """An allowed addition, or the map that holds it (its "." entry)."""
    return any(allowed[: len(path)] == path for allowed in ALLOWED_ADDITIONS)


def _is_ours(entry: JSON, field_manager: str) -> bool:
    return (
        entry.get("manager") == field_manager
        and entry.get("operation") == "Apply"
        and not entry.get("subresource")
    )


def _is_foreign(entry: JSON, field_manager: str) -> bool:
    return (
        entry.get("manager") != field_manager
        and (entry.get("subresource") or "") in OUR_SUBRESOURCES
        and entry.get("fieldsType", "FieldsV1") == "FieldsV1"
    )


def _merged(entries: Iterator[JSON]) -> dict[str, Any]:
    """The union of the fieldsV1 trees of `entries` (normally there is exactly one)."""
    merged: dict[str, Any] = {}
    for entry in entries:
        _merge_into(merged, entry.get("fieldsV1") or {})
    return merged


def _merge_into(target: dict[str, Any], tree: JSON) -> None:
    for key, sub in tree.items():
        _merge_into(target.setdefault(key, {}), sub if isinstance(sub, Mapping) else {})


# -- declared fields that our entry does not own -----------------------------------------------


def _unowned(value: Any, owned: JSON, path: Path) -> Iterator[Path]:
    """Paths of the leaves of manifest `value` that the fieldsV1 tree `owned` lacks.

    An empty tree owns its whole value: a scalar, or an atomic list or map (`args`).
    """
    if not owned:
        return
    if isinstance(value, Mapping):
        for key, sub in value.items():
            if path == () and key in ("apiVersion", "kind"):
                continue
            if path == ("f:metadata",) and key in ("name", "namespace"):
                continue
            fkey = f"f:{key}"
            if fkey not in owned:
                yield (*path, fkey)
            else:
                yield from _unowned(sub, owned[fkey], (*path, fkey))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            key = _element_key(owned, item)
            if key is None:
                yield (*path, f"i:{index}")
            elif isinstance(item, Mapping):
                yield from _unowned(item, owned[key], (*path, key))


def _element_key(owned: JSON, item: Any) -> str | None:
    """The key in fieldsV1 tree `owned` (a list's) that names list element `item`."""
    for key in owned:
        if key.startswith("k:") and isinstance(item, Mapping) and _key_matches(key, item):
            return key
        if key.startswith("v:") and _json_value(key) == item:
            return key
    return None


def _key_matches(key: str, item: JSON) -> bool:
    """Whether element `item` is the one named by `k:{...}`. A key field the manifest leaves
    out (the API server defaults it, e.g. a port's protocol) does not count against it."""
    fields = _json_value(key)
    if not isinstance(fields, dict):
        return False
    present = [name for name in fields if name in item]
    return bool(present) and all(item[name] == fields[name] for name in present)


def _json_value(key: str) -> Any:
    try:
        return json.loads(key[2:])
    except ValueError:
        return None


# -- fields under spec owned by another manager -------------------------------------------------


def _leaves(tree: JSON, path: Path) -> Iterator[Path]:
    """Every owned path in a fieldsV1 tree ("." marks the node at `path` itself as owned)."""
    for key, sub in tree.items():
        if key == ".":
            yield path
        elif isinstance(sub, Mapping) and sub:
            yield from _leaves(sub, (*path, key))
        else:
            yield (*path, key)


def locate(obj: Any, path: Path) -> list[str | int] | None:
    """The JSON-pointer tokens of `path` in `obj` (a manifest or a live object); None if absent."""
    tokens: list[str | int] = []
    node = obj
    for key in path:
        step = _step(node, key)
        if step is None:
            return None
        token, node = step
        tokens.append(token)
    return tokens


def _step(node: Any, key: str) -> tuple[str | int, Any] | None:
    if key.startswith("f:"):
        name = key[2:]
        if isinstance(node, Mapping) and name in node:
            return name, node[name]
        return None
    if not isinstance(node, list):
        return None
    if key.startswith("i:"):
        index = int(key[2:]) if key[2:].isdigit() else -1
        return (index, node[index]) if 0 <= index < len(node) else None
    for index, item in enumerate(node):
        if key.startswith("k:") and isinstance(item, Mapping) and _key_matches(key, item):
            return index, item
        if key.startswith("v:") and _json_value(key) == item:
            return index, item
    return None


def _owner_of(path: Path, foreign: list[JSON]) -> str | None:
    """The foreign manager whose fieldsV1 tree holds `path` (or a field below it)."""
    for entry in foreign:
        node: Any = entry.get("fieldsV1") or {}
        for key in path:
            node = node.get(key) if isinstance(node, Mapping) else None
            if node is None:
                break
        else:
            return str(entry.get("manager"))
    return None


def _outermost(changes: list[Change]) -> list[Change]:
    """Drop duplicates and changes inside another change's path (an added env var is one
    change, not one per field of it)."""
    out: list[Change] = []
    for change in sorted(changes, key=lambda c: (len(c.path), c.path)):
        if not any(change.path[: len(kept.path)] == kept.path for kept in out):
            out.append(change)
    return sorted(out, key=lambda c: c.path)


# -- restoring and describing -------------------------------------------------------------------


def removal_patch(changes: list[Change], live: JSON) -> list[dict[str, Any]]:
    """A JSON patch removing the `added` fields from `live`. Empty: nothing to remove.

    Each removal is guarded by a `test` of the value it removes, so the API server answers 422
    when those very fields changed meanwhile (a list index may have shifted); unrelated writes,
    such as the controllers' status updates, do not get in the way. Removals run from the last
    list index to the first, so earlier ones do not shift later ones.
    """
    pointers = []
    for change in changes:
        if change.added:
            tokens = locate(live, change.path)
            if tokens:
                pointers.append(tokens)
    ordered = sorted(pointers, key=_sort_key, reverse=True)
    tests = [{"op": "test", "path": _pointer(t), "value": _value_at(live, t)} for t in ordered]
    return [*tests, *({"op": "remove", "path": _pointer(t)} for t in ordered)]


def _value_at(obj: Any, tokens: list[str | int]) -> Any:
    for token in tokens:
        obj = obj[token]
    return obj


def _sort_key(tokens: list[str | int]) -> list[tuple[int, str, int]]:
    return [(0, t, 0) if isinstance(t, str) else (1, "", t) for t in tokens]


def _pointer(tokens: list[str | int]) -> str:
    return "".join("/" + str(t).replace("~", "~0").replace("/", "~1") for t in tokens)


def field_name(path: Path) -> str:
    """A readable name: spec.template.spec.containers[name=kubellm].args."""
    out = ""
    for key in path:
        kind, rest = key[:2], key[2:]
        if kind == "f:":
            out += ("." if out else "") + rest
        elif kind == "k:":
            fields = _json_value(key)
            pairs = fields.items() if isinstance(fields, dict) else []
            out += "[" + ",".join(f"{k}={v}" for k, v in pairs) + "]"
        elif kind == "v:":
            out += f"[{rest}]"
        else:
            out += f"[{rest}]"
    return out


def describe(kind: str, name: str, changes: list[Change]) -> str:
    """One line for the Event: "statefulset a-engine spec.replicas was changed by kubectl"."""
    parts = []
    for change in changes:
        what = field_name(change.path)
        if not change.path:
            parts.append("was not applied by the operator")
        elif change.added:
            parts.append(f"{what} was added by {change.manager}")
        elif change.manager is None:
            parts.append(f"{what} was removed")
        else:
            parts.append(f"{what} was changed by {change.manager}")
    return f"{kind.lower()} {name} " + "; ".join(parts)
