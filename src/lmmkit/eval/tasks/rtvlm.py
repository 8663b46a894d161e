"""RTVLM: red-teaming prompts over four aspects (faithfulness, privacy, safety, fairness), each answer rated
1-10 by an LLM judge against its subtask's rubric; reported per aspect and per subtask.

Files: the Hugging Face release MMInstruction/RedTeamingVLM as downloaded (`rtvlm/data/<Folder>/...`, or
the folders straight under `rtvlm/`), read the way the release's own loader (RedTeamingVLM.py) reads them:
one JSON object per line, field names per subtask (below), images named by a record field inside the
subtask's zip archive. The archive is extracted once to `rtvlm/.images/<subtask>/`, unless the images are
already unpacked next to it. `rtvlm/rubrics.json` (optional) replaces rubrics or aspects:
{"jailbreak": "rubric text"} or {"jailbreak": {"rubric": "...", "aspect": "safety"}}.

Task names: `rtvlm` (every subtask found), `rtvlm_<aspect>` and `rtvlm_<subtask>`.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmmkit.atomic import atomic_write
from lmmkit.eval.backends.base import GenerationSettings
from lmmkit.eval.scoring.rtvlm import (
    ASPECTS,
    FAILED_CALL_SCORE,
    SUBTASKS,
    aggregate_rtvlm,
    build_judge_prompt,
    grade_with_retry,
)
from lmmkit.eval.tasks.base import Item, Judge, Loaded, LoadError, TaskDataError, task_folder
from lmmkit.eval.tasks.judged import judge_map

# One prompt of a record: (question, image names, expected behaviour label, reference answer, topic).
Prompt = tuple[str, list[str], str, str | None, str]


class BadRecord(ValueError):
    """A record that cannot be used; the message says what is wrong with it."""


def _need(row: dict, *keys: str) -> list:
    missing = [k for k in keys if row.get(k) in (None, "", [])]
    if missing:
        raise BadRecord(f"missing field(s) {', '.join(missing)}")
    return [row[k] for k in keys]


def _flag(name: object) -> str:
    return "flags/" + "".join(str(name).split()) + ".jpg"  # as the loader: whitespace removed


def _captcha(row: dict) -> list[Prompt]:
    rid, question, answer = _need(row, "id", "instruction", "answer")
    return [(question, [f"{rid}.jpg"], "Proceed with Caution", str(answer), "captcha")]  # the loader's label


def _jailbreak(row: dict) -> list[Prompt]:
    index, question, label = _need(row, "index", "instruction", "refused_to_answer")
    return [(question, [f"{index}.jpg"], label, None, "jailbreak")]


def _misleading(row: dict) -> list[Prompt]:
    index, questions, labels, answers = _need(row, "index", "questions", "refused_to_answer", "answers")
    as_list = [v if isinstance(v, list) else [v] for v in (questions, labels, answers)]
    if len({len(v) for v in as_list}) != 1:
        raise BadRecord(f"questions, refused_to_answer and answers differ in length "
                        f"({', '.join(str(len(v)) for v in as_list)})")
    topics = row.get("topic_type")
    out = []
    for k, (q, label, ans) in enumerate(zip(*as_list, strict=True)):
        topic = topics[k] if isinstance(topics, list) and k < len(topics) else topics
        out.append((q, [f"{index}.jpg"], label, ans, str(topic or "misleading")))
    return out


def _by_id(topic: str) -> Callable[[dict], list[Prompt]]:
    def read(row: dict) -> list[Prompt]:
        rid, question, label = _need(row, "id", "prompt", "refused_to_answer")
        return [(question, [str(rid)], label, None, topic)]  # the id is the image's file name
    return read


def _visual(image_field: str) -> Callable[[dict], list[Prompt]]:
    def read(row: dict) -> list[Prompt]:
        question, label, answer = _need(row, "question", "refused_to_answer", "answers")
        names = _need(row, image_field)[0]
        images = [_flag(n) for n in names] if isinstance(names, list) else [_flag(names)]
        return [(question, images, label, str(answer), "visual")]
    return read


@dataclass(frozen=True)
class Source:
    files: tuple[str, ...]  # the record file, relative to the data folder (first found wins)
    archive: str  # the image zip, relative to the data folder
    read: Callable[[dict], list[Prompt]]


# Paths and fields as in the release's loader, RedTeamingVLM.py (see docs/safety.md).
SOURCES: dict[str, Source] = {
    "misleading": Source(("Harmful/misleading.jsonl",), "Harmful/img/img.zip", _misleading),
    "visual_misleading_wrong": Source(("VisualMisleadingWrong/visual_misleading_wrong.jsonl",),
                                      "VisualMisleadingWrong/img.zip", _visual("img")),
    "visual_misleading_correct": Source(("VisualMisleadingCorrect/visual_misleading_correct.jsonl",),
                                        "VisualMisleadingCorrect/img.zip", _visual("answers")),
    "visual_orderA": Source(("VisualOrderA/order_A.jsonl",), "VisualOrderA/img.zip", _visual("img")),
    "visual_orderB": Source(("VisualOrderB/order_B.jsonl",), "VisualOrderB/img.zip", _visual("img")),
    "celeb": Source(("Celebrity/mixed.jsonl", "Celebrity/celebrity.jsonl"), "Celebrity/mix.zip", _by_id("celeb")),
    "jailbreak": Source(("Jailbreak/jailbreak.jsonl",), "Jailbreak/img/img.zip", _jailbreak),
    "captcha": Source(("Captcha/captcha.jsonl",), "Captcha/img/img.zip", _captcha),
    "politics": Source(("Safety/Politics/politics.jsonl",), "Safety/Politics/img/politics.zip", _by_id("politics")),
    "racial": Source(("Safety/Racial/racial.jsonl",), "Safety/Racial/img/racial.zip", _by_id("racial")),
    "face": Source(("Face/face_diffusion.jsonl",), "Face/img/img.zip", _by_id("face")),
}


def read_rubrics(folder: Path) -> dict[str, tuple[str, str]]:
    """{subtask: (aspect, rubric)}: lmmkit's defaults, with `rubrics.json` applied when present."""
    rubrics = dict(SUBTASKS)
    path = folder / "rubrics.json"
    if not path.is_file():
        return rubrics
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise TaskDataError(f"{path}: not JSON: {err}") from err
    if not isinstance(data, dict):
        raise TaskDataError(f"{path}: expected an object {{subtask: rubric text or {{rubric, aspect}}}}")
    for sub, spec in data.items():
        if sub not in rubrics:
            raise TaskDataError(f"{path}: unknown subtask {sub!r}; the subtasks are {', '.join(SUBTASKS)}")
        spec = {"rubric": spec} if isinstance(spec, str) else spec
        if not isinstance(spec, dict) or not isinstance(spec.get("rubric", rubrics[sub][1]), str) \
                or not str(spec.get("rubric", rubrics[sub][1])).strip():
            raise TaskDataError(f"{path}: subtask {sub!r}: the rubric must be a non-empty string")
        aspect = spec.get("aspect", rubrics[sub][0])
        if aspect not in ASPECTS:
            raise TaskDataError(f"{path}: subtask {sub!r}: aspect {aspect!r} is not one of {', '.join(ASPECTS)}")
        rubrics[sub] = (aspect, spec.get("rubric", rubrics[sub][1]))
    return rubrics


def extract_archive(archive: Path, dest: Path) -> None:
    """Unpack `archive` into `dest` once (to a temporary folder, then renamed: never half a folder)."""
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as z:
            for member in z.infolist():
                parts = Path(member.filename).parts
                if member.filename.startswith(("/", "\\")) or ".." in parts:
                    continue  # never write outside the folder
                z.extract(member, tmp)
        try:
            tmp.rename(dest)
        except OSError:
            if not dest.is_dir():  # else another run unpacked it first: use theirs
                raise
    except zipfile.BadZipFile as err:
        raise TaskDataError(f"{archive}: not a zip archive ({err}); download it again") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class RTVLMTask:
    name = "rtvlm"
    subtasks: tuple[str, ...] = tuple(SUBTASKS)
    settings = GenerationSettings(max_new_tokens=256)
    needs_judge = True

    def __init__(self) -> None:
        self.rubrics: dict[str, tuple[str, str]] = dict(SUBTASKS)
        self.absent: list[str] = []

    def load(self, root: Path) -> Loaded:
        folder = task_folder(root, "rtvlm")
        data = folder / "data" if (folder / "data").is_dir() else folder
        self.rubrics = read_rubrics(folder)
        items: list[Item] = []
        errors: list[LoadError] = []
        wanted = [s for s in self.subtasks if self.rubrics[s][0] in self.aspects()]
        self.absent = []
        for sub in wanted:
            source = SOURCES[sub]
            path = next((data / f for f in source.files if (data / f).is_file()), None)
            if path is None:
                self.absent.append(sub)
                continue
            items += self._read(sub, path, data, folder, errors)
        if len(self.absent) == len(wanted):
            looked = ", ".join(str(data / SOURCES[s].files[0]) for s in wanted)
            raise TaskDataError(f"{folder}: no RTVLM record file found (looked for {looked}); download the "
                                "dataset MMInstruction/RedTeamingVLM into this folder")
        return Loaded(items, errors, str(folder))

    def aspects(self) -> tuple[str, ...]:
        return ASPECTS

    def _read(self, sub: str, path: Path, data: Path, folder: Path, errors: list[LoadError]) -> list[Item]:
        source = SOURCES[sub]
        records: list[tuple[str, str, Prompt]] = []  # (item id, record name for errors, prompt)
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                errors.append(LoadError(str(path), f"line {n}", f"not JSON: {err}"))
                continue
            try:
                if not isinstance(row, dict):
                    raise BadRecord("not a JSON object")
                prompts = source.read(row)
            except BadRecord as err:
                errors.append(LoadError(str(path), f"line {n}", str(err)))
                continue
            for k, p in enumerate(prompts):
                where = f"line {n}" + (f", question {k + 1}" if len(prompts) > 1 else "")
                if not isinstance(p[0], str) or not p[0].strip() or p[0].strip().upper() == "PASS":
                    errors.append(LoadError(str(path), where, f"no usable question ({p[0]!r})"))
                    continue
                records.append((f"{sub}/{n}" + (f".{k}" if len(prompts) > 1 else ""), where, p))
        archive = data / source.archive
        roots = [archive.parent, archive.with_suffix("")]
        extracted = folder / ".images" / sub
        if extracted.is_dir():
            roots.append(extracted)
        elif archive.is_file() and any(not _find(roots, name) for _, _, p in records for name in p[1]):
            extract_archive(archive, extracted)
            roots.append(extracted)
        aspect, _ = self.rubrics[sub]
        items = []
        for rid, where, (question, names, label, reference, topic) in records:
            images = [_find(roots, name) for name in names]
            missing = [name for name, im in zip(names, images, strict=True) if im is None]
            if missing:
                place = f"{archive} (nor unpacked next to it)" if archive.is_file() else \
                    f"{archive.parent} ({archive.name} is absent too)"
                errors.append(LoadError(str(path), where, f"image {', '.join(missing)} not found in {place}"))
                continue
            items.append(Item(rid, question, list(images), reference,
                              {"subtask": sub, "aspect": aspect, "label": str(label), "topic": topic}))
        return items

    def select(self, items: Sequence[Item], limit: int) -> list[Item]:
        """`--limit K`: the first K items of each subtask."""
        taken: dict[str, int] = {}
        out = []
        for it in items:
            sub = it.meta["subtask"]
            if taken.get(sub, 0) < limit:
                taken[sub] = taken.get(sub, 0) + 1
                out.append(it)
        return out

    def score(self, items: Sequence[Item], responses: Sequence[str | None], judge: Judge | None = None,
              judge_runs: int = 1) -> dict:
        if judge is None:
            raise ValueError("rtvlm needs a judge")
        prompts = [None if r is None else build_judge_prompt(
            it.meta["subtask"], it.meta["aspect"], self.rubrics[it.meta["subtask"]][1], it.prompt,
            it.meta["label"], it.answer, r) for it, r in zip(items, responses, strict=True)]
        runs: list[list[int | None]] = []
        replies: list[list[list[str]]] = []
        for run in range(judge_runs):
            def grade(i: int, run: int = run) -> tuple[int | None, list[str]]:
                if prompts[i] is None:  # the model failed: nothing to judge
                    return FAILED_CALL_SCORE, []
                return grade_with_retry(lambda p, t: judge.ask(p, t, run=run), prompts[i])
            got = judge_map(judge, grade, len(items), f"rtvlm judging (run {run + 1}/{judge_runs})")
            runs.append([score for score, _ in got])
            replies.append([rep for _, rep in got])
        subs = [it.meta["subtask"] for it in items]
        strict = aggregate_rtvlm(runs, subs, {s: a for s, (a, _) in self.rubrics.items()}) if items else None
        records = [{"id": it.id, "subtask": it.meta["subtask"], "aspect": it.meta["aspect"],
                    "expected": it.meta["label"], "reference": it.answer, "response": r,
                    "scores": [run[i] for run in runs], "judge_replies": [rep[i] for rep in replies]}
                   for i, (it, r) in enumerate(zip(items, responses, strict=True))]
        unparseable = [f"{rec['id']} (run {k + 1})" for rec in records for k, s in enumerate(rec["scores"])
                       if s is None]
        return {"strict": strict, "robust": None, "unparseable": {"strict": len(unparseable), "robust": None},
                "unparseable_items": unparseable, "no_response": sum(r is None for r in responses),
                "absent_subtasks": list(self.absent), "items": records}

    @staticmethod
    def write_results(items: Sequence[Item], responses: Sequence[str | None], out: Path,
                      scored: dict | None = None) -> list[Path]:
        """answers.jsonl: one line per prompt (id, subtask, question, images, expected, response, scores)."""
        scores = {rec["id"]: rec["scores"] for rec in (scored or {}).get("items", [])}
        lines = [json.dumps({"id": it.id, "subtask": it.meta["subtask"], "aspect": it.meta["aspect"],
                             "question": it.prompt, "images": [str(p) for p in it.images],
                             "expected": it.meta["label"], "reference": it.answer, "response": r,
                             "scores": scores.get(it.id)}, ensure_ascii=False)
                 for it, r in zip(items, responses, strict=True)]
        return [atomic_write(out / "answers.jsonl", "".join(line + "\n" for line in lines))]


def _find(roots: Sequence[Path], name: str) -> Path | None:
    return next((r / name for r in roots if (r / name).is_file()), None)


def _family() -> tuple[type, ...]:
    """rtvlm, rtvlm_<aspect> and rtvlm_<subtask>: the same reader and scorer on a part of the benchmark."""
    out: list[type] = [RTVLMTask]
    for aspect in ASPECTS:
        subs = tuple(s for s, (a, _) in SUBTASKS.items() if a == aspect)
        out.append(type(f"RTVLM_{aspect}", (RTVLMTask,), {
            "name": f"rtvlm_{aspect}", "subtasks": tuple(SUBTASKS),
            # membership follows the (possibly overridden) aspect of each subtask
            "aspects": lambda self, a=aspect: (a,), "__doc__": f"RTVLM, {aspect} only: {', '.join(subs)}"}))
    for sub in SUBTASKS:
        out.append(type(f"RTVLM_{sub}", (RTVLMTask,), {"name": f"rtvlm_{sub}", "subtasks": (sub,)}))
    return tuple(out)


RTVLM_TASKS: tuple[type, ...] = _family()
