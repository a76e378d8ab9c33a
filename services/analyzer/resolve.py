"""Step 2: build-ids → the exact binary and debuginfo RPMs that carry them."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from services.analyzer.coredump import Module
from services.common.store import BuildIdHit, BuildIdKind, Package, Store

# Packages without build-ids that every root needs: the merged-/usr links
# (/lib64 → usr/lib64) through which a core records the dynamic loader.
BASE_PACKAGES = ("filesystem",)


@dataclass(frozen=True)
class Served:
    """Which packages serve one module."""

    module: Module
    binary: Package | None
    debug: Package | None


@dataclass
class Resolution:
    """The package set for a core, and what could not be found."""

    served: list[Served] = field(default_factory=list)
    extra: list[Package] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    os_release: str | None = None

    @property
    def packages(self) -> list[Package]:
        """Every package the root needs, each once, in a stable order."""
        seen: dict[int, Package] = {}
        for s in self.served:
            for package in (s.binary, s.debug):
                if package is not None:
                    seen.setdefault(package.id, package)
        for package in self.extra:
            seen.setdefault(package.id, package)
        # gdb prints no source text here: debugsource packages would only cost unpacking.
        wanted = (p for p in seen.values() if not p.nevra.name.endswith("-debugsource"))
        return sorted(wanted, key=lambda p: (p.nevra.name, p.id))

    @property
    def missing_debug(self) -> list[Module]:
        """Modules (other than the vDSO) whose debug information was not found."""
        return [s.module for s in self.served if s.debug is None and not s.module.is_vdso]


def _choose(build_id: str, hits: list[BuildIdHit], notes: list[str]) -> Package | None:
    if not hits:
        return None
    # Deterministic: the package mirrored first (lowest id) wins.
    ordered = sorted(hits, key=lambda h: h.package.id)
    chosen = ordered[0].package
    if len({h.package.id for h in ordered}) > 1:
        others = ", ".join(str(h.package.nevra) for h in ordered[1:])
        notes.append(
            f"build-id {build_id} is in several packages; chose {chosen.nevra} "
            f"(mirrored first) over {others}"
        )
    return chosen


def resolve(store: Store, modules: list[Module], arch: str) -> Resolution:
    """Map every module's build-id to the packages that carry it."""
    ids = [m.build_id for m in modules if m.build_id]
    by_id: dict[tuple[str, BuildIdKind], list[BuildIdHit]] = defaultdict(list)
    for hit in store.find_build_ids(ids):
        by_id[hit.build_id, hit.kind].append(hit)
    result = Resolution()
    for module in modules:
        if module.build_id is None or module.is_vdso:
            result.served.append(Served(module, None, None))
            continue
        binary = _choose(module.build_id, by_id[module.build_id, BuildIdKind.BINARY], result.notes)
        debug = _choose(module.build_id, by_id[module.build_id, BuildIdKind.DEBUG], result.notes)
        result.served.append(Served(module, binary, debug))
    releases = Counter(s.binary.os_release for s in result.served if s.binary is not None)
    if releases:
        os_release = releases.most_common(1)[0][0]
        result.os_release = os_release
        for name in BASE_PACKAGES:
            candidates = store.find_packages(name, os_release, arch) or store.find_packages(
                name, os_release, "noarch"
            )
            if candidates:
                result.extra.append(candidates[0])
            else:
                result.notes.append(f"no '{name}' package is mirrored for {os_release}")
    return result
