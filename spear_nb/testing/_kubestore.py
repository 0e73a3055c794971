"""The object store of the local API server: pods, namespaces, resource versions.

Everything here is guarded by ``Store.cond``; the HTTP handlers and the kubelet
threads take it for each change. Every change of a pod gets the next resource
version and is appended to a bounded event history that watches read from.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

Pod = dict[str, Any]

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)$")
_QUANTITY = re.compile(r"^[+]?(\d+(\.\d*)?|\.\d+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
RESTART_POLICIES = ("Always", "OnFailure", "Never")


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def status_body(
    code: int, reason: str, message: str, details: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A ``Status`` object shaped like the ones the real API server returns."""
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details is not None:
        body["details"] = details
    return body


class ApiError(Exception):
    """An error answer: HTTP status plus the Status body."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.body = status_body(code, reason, message, details)


# -- selectors -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Requirement:
    """One term of a selector: ``key`` compared with ``values`` by ``op``."""

    key: str
    op: str  # "in", "notin", "exists" or "!exists"
    values: frozenset[str] = frozenset()

    def __call__(self, labels: dict[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!exists":
            return self.key not in labels
        found = labels.get(self.key)
        if self.op == "in":
            return found in self.values
        return found not in self.values


@dataclasses.dataclass(frozen=True)
class Selector:
    """All requirements of a label or field selector; empty matches everything."""

    requirements: tuple[Requirement, ...]

    def __call__(self, labels: dict[str, str]) -> bool:
        return all(r(labels) for r in self.requirements)


def _split_terms(text: str) -> list[str]:
    """Split a selector at the commas that are not inside parentheses."""
    terms: list[str] = []
    depth, current = 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            terms.append(current.strip())
            current = ""
        else:
            current += char
    if current.strip():
        terms.append(current.strip())
    return terms


def _requirement(term: str) -> Requirement:
    match = re.fullmatch(r"(\S+)\s+(in|notin)\s+\((.*)\)", term)
    if match:
        values = frozenset(v.strip() for v in match.group(3).split(",") if v.strip())
        return Requirement(match.group(1), match.group(2), values)
    if "!=" in term:
        key, value = term.split("!=", 1)
        return Requirement(key.strip(), "notin", frozenset({value.strip()}))
    if "=" in term:
        key, value = term.replace("==", "=").split("=", 1)
        return Requirement(key.strip(), "in", frozenset({value.strip()}))
    if term.startswith("!"):
        return Requirement(term[1:].strip(), "!exists")
    if re.fullmatch(r"[A-Za-z0-9./_-]+", term):
        return Requirement(term, "exists")
    raise ApiError(400, "BadRequest", f"unable to parse requirement: {term!r}")


def label_selector(text: str) -> Selector:
    """Parse ``a=b,c!=d,e,!f,g in (h,i),j notin (k)``."""
    return Selector(tuple(_requirement(t) for t in _split_terms(text or "")))


FIELDS = ("metadata.name", "metadata.namespace", "status.phase", "spec.nodeName")


def pod_fields(pod: Pod) -> dict[str, str]:
    """The fields of a pod that field selectors may name."""
    return {
        "metadata.name": pod["metadata"].get("name", ""),
        "metadata.namespace": pod["metadata"].get("namespace", ""),
        "status.phase": pod.get("status", {}).get("phase", ""),
        "spec.nodeName": pod.get("spec", {}).get("nodeName", ""),
    }


def field_selector(text: str) -> Selector:
    """Parse ``metadata.name=x,status.phase!=Running`` (equality only)."""
    requirements = []
    for term in _split_terms(text or ""):
        requirement = _requirement(term)
        if requirement.key not in FIELDS or requirement.op not in ("in", "notin"):
            raise ApiError(
                400, "BadRequest", f'field label not supported: "{requirement.key}"'
            )
        requirements.append(requirement)
    return Selector(tuple(requirements))


# -- validation ------------------------------------------------------------------


def validate_pod(pod: Pod, namespace: str) -> None:
    """Raise a 422 ``Invalid`` error listing what is wrong with a new pod."""
    causes: list[dict[str, str]] = []

    def bad(field: str, reason: str, message: str) -> None:
        causes.append({"reason": reason, "message": message, "field": field})

    meta = pod.get("metadata") or {}
    name = meta.get("name", "")
    if not name:
        bad(
            "metadata.name",
            "FieldValueRequired",
            "Required value: name or generateName is required",
        )
    elif len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        bad(
            "metadata.name",
            "FieldValueInvalid",
            f'Invalid value: "{name}": a '
            "lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
            "characters, '-' or '.', and must start and end with an alphanumeric "
            "character",
        )
    for key, value in (meta.get("labels") or {}).items():
        _check_label(key, value, bad)
    spec = pod.get("spec") or {}
    containers = spec.get("containers") or []
    if not containers:
        bad("spec.containers", "FieldValueRequired", "Required value")
    seen: set[str] = set()
    for index, container in enumerate(containers):
        where = f"spec.containers[{index}]"
        cname = container.get("name", "")
        if not cname:
            bad(f"{where}.name", "FieldValueRequired", "Required value")
        elif len(cname) > 63 or not _DNS_LABEL.match(cname):
            bad(f"{where}.name", "FieldValueInvalid", f'Invalid value: "{cname}"')
        elif cname in seen:
            bad(f"{where}.name", "FieldValueDuplicate", f'Duplicate value: "{cname}"')
        seen.add(cname)
        if not container.get("image"):
            bad(f"{where}.image", "FieldValueRequired", "Required value")
        for pindex, port in enumerate(container.get("ports") or []):
            number = port.get("containerPort")
            if not isinstance(number, int) or not 0 < number < 65536:
                bad(
                    f"{where}.ports[{pindex}].containerPort",
                    "FieldValueInvalid",
                    f"Invalid value: {number!r}: must be between 1 and 65535",
                )
        resources = container.get("resources") or {}
        for group in ("requests", "limits"):
            for resource, quantity in (resources.get(group) or {}).items():
                if not _QUANTITY.match(str(quantity)):
                    bad(
                        f"{where}.resources.{group}[{resource}]",
                        "FieldValueInvalid",
                        f'Invalid value: "{quantity}": must match the regular '
                        "expression of a quantity",
                    )
    policy = spec.get("restartPolicy", "Always")
    if policy not in RESTART_POLICIES:
        bad(
            "spec.restartPolicy",
            "FieldValueNotSupported",
            f'Unsupported value: "{policy}": supported values: "Always", '
            '"OnFailure", "Never"',
        )
    if causes:
        summary = "; ".join(f"{c['field']}: {c['message']}" for c in causes)
        raise ApiError(
            422,
            "Invalid",
            f'Pod "{name}" is invalid: {summary}',
            {"name": name, "kind": "Pod", "causes": causes},
        )


def _check_label(key: str, value: Any, bad: Callable[[str, str, str], None]) -> None:
    prefix, _, label = key.rpartition("/")
    if (prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix))) or (
        not label or len(label) > 63 or not _LABEL_NAME.match(label)
    ):
        bad(
            "metadata.labels",
            "FieldValueInvalid",
            f'Invalid value: "{key}": a valid label key',
        )
    text = value if isinstance(value, str) else ""
    if not isinstance(value, str) or (
        text and (len(text) > 63 or not _LABEL_NAME.match(text))
    ):
        bad(
            "metadata.labels",
            "FieldValueInvalid",
            f'Invalid value: "{value}": '
            "a valid label must be 63 characters or less, alphanumeric, '-', '_' "
            "or '.', starting and ending with an alphanumeric character",
        )


def qos_class(pod: Pod) -> str:
    """BestEffort, Burstable or Guaranteed, from the containers' resources."""
    containers = pod["spec"]["containers"]
    if all(not (c.get("resources") or {}) for c in containers):
        return "BestEffort"
    for c in containers:
        resources = c.get("resources") or {}
        limits = resources.get("limits") or {}
        requests = resources.get("requests") or limits
        if set(limits) < {"cpu", "memory"} or requests != limits:
            return "Burstable"
    return "Guaranteed"


def default_pull_policy(image: str) -> str:
    tag = image.rsplit("/", 1)[-1]
    if "@" in tag:
        return "IfNotPresent"
    if ":" not in tag or tag.endswith(":latest"):
        return "Always"
    return "IfNotPresent"


# -- the store -------------------------------------------------------------------


@dataclasses.dataclass
class Event:
    rv: int
    type: str
    labels: dict[str, str]
    fields: dict[str, str]
    line: bytes


class Store:
    """Namespaces, pods and the history of pod events."""

    def __init__(self, history: int) -> None:
        self.cond = threading.Condition()
        self.rv = 0
        self.namespaces: dict[str, dict[str, Any]] = {}
        self.pods: dict[tuple[str, str], Pod] = {}
        self.events: deque[Event] = deque()
        self.history = history
        self.oldest = 0  # a watch may resume from any version >= oldest
        self.epoch = 0  # bumped to end every open watch (a timeout)
        self.gone_epoch = 0  # bumped to end every open watch with 410 Gone
        self.closed = False
        self.watches = 0  # watch requests being served now

    def next_rv(self) -> int:
        self.rv += 1
        return self.rv

    def add_namespace(self, name: str) -> None:
        with self.cond:
            if name in self.namespaces:
                return
            self.namespaces[name] = {
                "kind": "Namespace",
                "apiVersion": "v1",
                "metadata": {
                    "name": name,
                    "uid": str(uuid.uuid4()),
                    "resourceVersion": str(self.next_rv()),
                    "creationTimestamp": now_rfc3339(),
                    "labels": {"kubernetes.io/metadata.name": name},
                },
                "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Active"},
            }

    def record(self, kind: str, pod: Pod) -> None:
        """Give ``pod`` a new resource version and log the event (hold ``cond``)."""
        rv = self.next_rv()
        pod["metadata"]["resourceVersion"] = str(rv)
        line = json.dumps({"type": kind, "object": pod}).encode() + b"\n"
        labels = dict(pod["metadata"].get("labels") or {})
        self.events.append(Event(rv, kind, labels, pod_fields(pod), line))
        while len(self.events) > self.history:
            self.oldest = self.events.popleft().rv
        self.cond.notify_all()

    def compact(self) -> None:
        """Forget the event history: older resource versions now get 410 Gone."""
        with self.cond:
            self.events.clear()
            self.oldest = self.rv

    def since(self, rv: int) -> list[Event] | None:
        """Events newer than ``rv``, or None if some of them were forgotten."""
        if rv < self.oldest:
            return None
        newer: list[Event] = []
        for event in reversed(self.events):
            if event.rv <= rv:
                break
            newer.append(event)
        newer.reverse()
        return newer
