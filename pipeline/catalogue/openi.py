"""OpenI's report archive: each report's findings and impression, and its MeSH labels."""

from __future__ import annotations

import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

from sqlalchemy.engine import Engine

from pipeline.catalogue.records import CatalogueError, Item, LoadSummary, Problem, store
from pipeline.catalogue.tables import _file_index
from pipeline.regular import open_regular


def load_openi(engine: Engine, source: Path, image_root: Path | None = None,
               progress: bool = True) -> LoadSummary:
    """OpenI ``NLMCXR_reports.tgz``: FINDINGS + IMPRESSION per parent image, MeSH as reference."""
    raw = open_regular(source, CatalogueError, only="give the reports' .tgz file itself")
    try:
        tar = tarfile.open(fileobj=raw, mode="r:*")
    except (tarfile.TarError, OSError) as e:
        raw.close()
        raise CatalogueError(f"{source}: not a tar archive of OpenI reports ({e})") from e
    members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".xml")]
    if not members:
        tar.close()
        raise CatalogueError(f"{source}: no XML reports inside; expected NLMCXR_reports.tgz")
    resolve = _file_index(image_root, Path(source).parent)

    def items() -> Iterator[Item]:
        with tar:
            for member in sorted(members, key=lambda m: m.name):
                f = tar.extractfile(member)
                try:
                    root = ET.parse(f).getroot()  # type: ignore[arg-type]
                except ET.ParseError as e:
                    yield Problem(None, member.name, f"malformed XML: {e}")
                    continue
                yield from _openi_report(root, member.name, resolve)

    return store(engine, items(), str(source), progress=progress)


def _openi_report(root: ET.Element, name: str, resolve: Callable[[str], str]) -> Iterator[Item]:
    sections = {el.get("Label"): (el.text or "").strip() for el in root.iter("AbstractText")}
    text = " ".join(s for s in (sections.get("FINDINGS"), sections.get("IMPRESSION")) if s)
    mesh = "; ".join((el.text or "").strip() for el in root.iter("major"))
    uid_el = root.find("uId")
    report_id = uid_el.get("id") if uid_el is not None else Path(name).stem
    parents = [el.get("id") for el in root.iter("parentImage") if el.get("id")]
    if not parents:
        yield Problem(None, report_id, f"report has no image (parentImage): {name}")
        return
    for image_id in parents:
        yield {"uid": image_id, "source": "openi", "patient_id": report_id, "text": text or None,
               "reference": mesh or None, "path": resolve(f"{image_id}.png"), "modality": "CR"}
