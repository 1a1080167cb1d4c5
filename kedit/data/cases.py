"""Edit cases: the data model and the readers / writer of case files.

One public entry point reads a file of edit cases in any of the layouts in use:

* ``kedit``    -- JSONL, one object a line: ``prompt``, ``subject``, ``target_new``,
  ``ground_truth``, ``rephrase_prompts``, ``locality`` / ``portability`` maps
  (name -> {"prompt": str | [str], "ground_truth": str | [str]}), ``case_id``,
  and, for cases that came from CounterFact, ``attribute_prompts`` and
  ``generation_prompts``.  This is what :func:`write_cases` writes.
* ``easyedit`` -- EasyEdit's flat layout (JSONL or a JSON array): ``rephrase_prompt``,
  ``locality_prompt`` / ``locality_ground_truth`` (-> locality "neighborhood"),
  ``portability_prompt`` / ``portability_ground_truth`` (-> portability
  "portability"); EasyEdit's nested ``locality`` / ``portability`` maps are the
  same as kedit's.
* ``rome``     -- the original CounterFact release: ``requested_rewrite`` {...},
  ``paraphrase_prompts``, ``neighborhood_prompts``, ``attribute_prompts``,
  ``generation_prompts``.
* ``zsre``     -- zsRE as split by MEND: ``src``, ``subject``, ``alt``, ``answers``,
  ``rephrase``, ``loc``, ``loc_ans`` (-> locality "nq").
* ``knowedit`` -- KnowEdit (Zhang et al. 2024) ZsRE, WikiData_counterfact and
  WikiData_recent: the prompt layout whose ``portability`` / ``locality`` map each
  kind to a *list* of ``{"prompt", "ground_truth"}`` items, ``ground_truth`` (of the
  edit and of each item) absent, a string, a list of strings or a list of alias
  lists.  Every kind becomes one prompt set of that name (several prompts per kind).
* ``wikibio``  -- KnowEdit's WikiBio: ``text`` (the prompt), ``labels`` (the new
  continuation), ``concept`` (the subject), ``locality`` as in ``knowedit``.

Answers given as lists are *alternatives*: every accepted answer of a prompt is kept
(:attr:`PromptSet.answers`, :attr:`EditCase.ground_truth_aliases`); the first is the
canonical one (``ground_truths`` / ``ground_truth``), the one EasyEdit keeps.  Empty
strings among them are dropped; an item with no answer left is skipped with a
warning (EasyEdit skips it too).

EasyEdit's portability files are read as extras of the zsRE and ROME layouts:
``portability`` ``{"New Question", "New Answer"}`` -> portability set "one_hop";
``alter_subject_question`` (zsRE) or ``alternative_subject`` (CounterFact, put into the
edit template) -> "subject_replace", answered by ``target_new``; ``inverse question``
-> "inverse_relation", answered by the subject.

Bad input raises :class:`CasesError`, whose message is one line naming the file,
the line (JSONL) or ``record N`` (JSON array, 1-based) and the field.

This module is a leaf: it imports only the standard library.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from kedit.util.atomic import write_text

__all__ = [
    "FORMATS",
    "CasesError",
    "EditCase",
    "PromptSet",
    "case_from_dict",
    "load_cases",
    "validate_cases",
    "write_cases",
]

log = logging.getLogger(__name__)

#: Values accepted for the ``fmt`` argument.
FORMATS = ("auto", "kedit", "easyedit", "rome", "zsre", "knowedit", "wikibio")

PLACEHOLDER = "{}"

# Keys of EasyEdit's flat layout (their presence marks a record as "easyedit").
_FLAT_KEYS = (
    "rephrase_prompt",
    "locality_prompt",
    "locality_ground_truth",
    "portability_prompt",
    "portability_ground_truth",
)

_MAX_SHOWN = 200  # longest value quoted in an error message


class CasesError(ValueError):
    """A case file (or one of its records) is unusable; the message is one line."""


# --------------------------------------------------------------------------- model


def _tuple_of_str(value: Iterable[str] | str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(value)


@dataclass(frozen=True)
class PromptSet:
    """A named group of extra prompts (a locality or portability *kind*), one answer each.

    ``answers[i]`` holds every accepted answer of prompt ``i`` (aliases or alternative
    answers, first = ``ground_truths[i]``); give either ``ground_truths`` (one answer a
    prompt, or one for all) or ``answers``.
    """

    name: str
    prompts: tuple[str, ...]
    ground_truths: tuple[str, ...] = ()
    answers: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self) -> None:
        prompts = _tuple_of_str(self.prompts)
        answers = tuple(_tuple_of_str(a) for a in self.answers)
        truths = _tuple_of_str(self.ground_truths)
        if answers:
            if any(not a for a in answers):
                raise CasesError(f"prompt set {self.name!r}: a prompt without answers")
            if truths and truths != tuple(a[0] for a in answers):
                raise CasesError(f"prompt set {self.name!r}: ground_truths are not the answers' first entries")
            truths = tuple(a[0] for a in answers)
        if len(truths) == 1 and len(prompts) > 1:
            truths = truths * len(prompts)
        if len(prompts) != len(truths):
            raise CasesError(
                f"prompt set {self.name!r}: {len(prompts)} prompts but {len(truths)} ground truths"
            )
        object.__setattr__(self, "prompts", prompts)
        object.__setattr__(self, "ground_truths", truths)
        object.__setattr__(self, "answers", answers or tuple((t,) for t in truths))

    def __len__(self) -> int:
        return len(self.prompts)

    def pairs(self) -> list[tuple[str, str]]:
        """``[(prompt, ground_truth), ...]``."""
        return list(zip(self.prompts, self.ground_truths))

    def to_dict(self) -> dict[str, Any] | list[dict[str, Any]]:
        """``{"prompt": ..., "ground_truth": ...}`` (a bare string when there is one); with
        alternative answers, KnowEdit's list ``[{"prompt": p, "ground_truth": [a, ...]}, ...]``."""
        if any(len(a) > 1 for a in self.answers):
            return [{"prompt": p, "ground_truth": list(a) if len(a) > 1 else a[0]}
                    for p, a in zip(self.prompts, self.answers)]
        if len(self.prompts) == 1:
            return {"prompt": self.prompts[0], "ground_truth": self.ground_truths[0]}
        return {"prompt": list(self.prompts), "ground_truth": list(self.ground_truths)}


@dataclass(frozen=True)
class EditCase:
    """One edit request plus the prompts used to evaluate it.

    ``template`` holds exactly one ``"{}"`` where the subject goes; :attr:`prompt`
    fills it in.  ``source`` ("path:line") is for messages only and takes no part
    in equality or hashing.
    """

    case_id: str
    template: str
    subject: str
    target_new: str
    ground_truth: str | None = None
    rephrase_prompts: tuple[str, ...] = ()
    locality: tuple[PromptSet, ...] = ()
    portability: tuple[PromptSet, ...] = ()
    generation_prompts: tuple[str, ...] = ()  # ROME layout only
    attribute_prompts: tuple[str, ...] = ()  # ROME layout only; their answer is target_new
    relation_id: str | None = None  # ROME layout only (e.g. "P103"): finds consistency's reference texts
    target_new_id: str | None = None  # ROME layout only (Wikidata id of target_new)
    ground_truth_aliases: tuple[str, ...] = ()  # every accepted ground truth; the first is ground_truth
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        # Accept lists from code that builds cases directly; store tuples (hashable).
        for name in ("rephrase_prompts", "generation_prompts", "attribute_prompts", "ground_truth_aliases"):
            object.__setattr__(self, name, _tuple_of_str(getattr(self, name)))
        # ground_truth decides; the aliases start with it (none without it)
        gt = self.ground_truth
        aliases = () if gt is None else (gt, *(a for a in self.ground_truth_aliases if a != gt))
        object.__setattr__(self, "ground_truth_aliases", aliases)
        for name in ("locality", "portability"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.template.count(PLACEHOLDER) != 1:
            raise CasesError(
                f"case {self.case_id!r}: template must hold exactly one '{{}}': {self.template!r}"
            )

    @property
    def prompt(self) -> str:
        """The template with the subject filled in."""
        return self.template.replace(PLACEHOLDER, self.subject, 1)

    def to_dict(self) -> dict[str, Any]:
        """The kedit JSONL layout (reads back to an equal case)."""
        filled = self.prompt
        # Write the filled-in prompt when the reader will find the template again from
        # it (first occurrence of the subject is the placeholder); else the template.
        if PLACEHOLDER not in filled and filled.replace(self.subject, PLACEHOLDER, 1) == self.template:
            prompt = filled
        else:
            prompt = self.template
        out: dict[str, Any] = {
            "case_id": self.case_id,
            "prompt": prompt,
            "subject": self.subject,
            "target_new": self.target_new,
        }
        if self.ground_truth is not None:
            out["ground_truth"] = self.ground_truth if len(self.ground_truth_aliases) < 2 \
                else list(self.ground_truth_aliases)
        if self.rephrase_prompts:
            out["rephrase_prompts"] = list(self.rephrase_prompts)
        if self.locality:
            out["locality"] = {ps.name: ps.to_dict() for ps in self.locality}
        if self.portability:
            out["portability"] = {ps.name: ps.to_dict() for ps in self.portability}
        if self.attribute_prompts:
            out["attribute_prompts"] = list(self.attribute_prompts)
        if self.generation_prompts:
            out["generation_prompts"] = list(self.generation_prompts)
        if self.relation_id is not None:
            out["relation_id"] = self.relation_id
        if self.target_new_id is not None:
            out["target_new_id"] = self.target_new_id
        return out


# ------------------------------------------------------------------ field checking


class _FieldError(Exception):
    """Raised inside record parsing; turned into a CasesError with the location."""

    def __init__(self, field_name: str | None, message: str):
        super().__init__(message)
        self.field = field_name
        self.message = message


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > _MAX_SHOWN:
        text = text[: _MAX_SHOWN - 4] + "...'"
    return text


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "boolean",
        int: "number",
        float: "number",
        str: "string",
        list: "list",
        dict: "object",
    }.get(type(value), type(value).__name__)


def _get(rec: dict, key: str, path: str | None = None) -> Any:
    if key not in rec:
        raise _FieldError(path or key, "missing required field")
    return rec[key]


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise _FieldError(name, f"expected a string, got {_type_name(value)} {_show(value)}")
    return value


def _target(value: Any, name: str) -> str:
    value = _string(value, name).strip()
    if not value:
        raise _FieldError(name, "empty target (nothing left after stripping whitespace)")
    return value


def _answers(value: Any, name: str) -> tuple[str, ...]:
    """A string, a list of strings or a list of alias lists -> the accepted answers, in
    order: stripped, empty ones and repeats dropped (possibly nothing)."""
    if not isinstance(value, list):
        return tuple(a for a in (_string(value, name).strip(),) if a)
    out: list[str] = []
    for i, item in enumerate(value):
        group = item if isinstance(item, list) else [item]
        for j, alias in enumerate(group):
            where = f"{name}[{i}][{j}]" if isinstance(item, list) else f"{name}[{i}]"
            if not isinstance(alias, str):
                raise _FieldError(where, f"expected a string{'' if isinstance(item, list) else ' or a list of aliases'}"
                                         f", got {_type_name(alias)} {_show(alias)}")
            alias = alias.strip()
            if alias and alias not in out:
                out.append(alias)
    return tuple(out)


def _string_list(value: Any, name: str) -> list[str]:
    """A string or a list of strings -> list of strings (not yet checked for emptiness)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise _FieldError(
            name, f"expected a string or a list of strings, got {_type_name(value)} {_show(value)}"
        )
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _FieldError(
                f"{name}[{i}]", f"expected a string, got {_type_name(item)} {_show(item)}"
            )
    return list(value)


def _prompt_list(value: Any, name: str) -> tuple[str, ...]:
    items = _string_list(value, name)
    for i, item in enumerate(items):
        if not item.strip():
            raise _FieldError(f"{name}[{i}]" if not isinstance(value, str) else name, "empty prompt")
    return tuple(items)


def _case_id(value: Any, name: str = "case_id") -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _FieldError(name, f"expected a string or an integer, got {_type_name(value)} {_show(value)}")
    text = str(value)
    if not text.strip():
        raise _FieldError(name, "empty case_id")
    return text


def _template(prompt: str, subject: str, prompt_field: str, subject_field: str) -> str:
    """The prompt with the subject's first occurrence replaced by "{}"."""
    if not subject.strip():
        raise _FieldError(subject_field, "empty subject")
    if PLACEHOLDER in subject:
        raise _FieldError(subject_field, f"subject {_show(subject)} contains '{{}}'")
    n = prompt.count(PLACEHOLDER)
    if n > 1:
        raise _FieldError(
            prompt_field, f"prompt {_show(prompt)} holds '{{}}' {n} times (at most one is allowed)"
        )
    if n == 1:
        return prompt
    if subject not in prompt:
        hint = ""
        if subject.lower() in prompt.lower():
            hint = " (it does with different letter case)"
        elif subject.strip() in prompt:
            hint = " (it does without the surrounding whitespace)"
        raise _FieldError(
            subject_field, f"{_show(subject)} does not occur in prompt {_show(prompt)}{hint}"
        )
    return prompt.replace(subject, PLACEHOLDER, 1)


def _prompt_set(name: str, prompts: Any, truths: Any, field_base: str, prompt_key: str,
                truth_key: str) -> PromptSet:
    p_field = f"{field_base}{prompt_key}"
    t_field = f"{field_base}{truth_key}"
    plist = _prompt_list(prompts, p_field)
    if not plist:
        raise _FieldError(p_field, "no prompts")
    tlist = _string_list(truths, t_field)
    if not tlist:
        raise _FieldError(t_field, "no ground truths")
    stripped = []
    for i, t in enumerate(tlist):
        t = t.strip()
        if not t:
            raise _FieldError(t_field if isinstance(truths, str) else f"{t_field}[{i}]",
                              "empty ground truth")
        stripped.append(t)
    if len(stripped) == 1 and len(plist) > 1:
        stripped = stripped * len(plist)
    if len(stripped) != len(plist):
        raise _FieldError(
            t_field,
            f"{len(plist)} prompts in '{p_field}' but {len(stripped)} ground truths "
            f"(give one ground truth per prompt, or a single one for all)",
        )
    return PromptSet(name=name, prompts=plist, ground_truths=tuple(stripped))


def _nested_sets(value: Any, key: str, source: str = "") -> list[PromptSet]:
    """``{"name": {"prompt": ..., "ground_truth": ...}, ...}`` or KnowEdit's
    ``{"kind": [{"prompt": ..., "ground_truth": ...}, ...], ...}`` -> prompt sets."""
    if value is None:
        return []
    if not isinstance(value, dict):
        raise _FieldError(key, f"expected an object of name -> {{prompt, ground_truth}}, got "
                               f"{_type_name(value)} {_show(value)}")
    sets = []
    for name, spec in value.items():
        base = f"{key}.{name}"
        if not name.strip():
            raise _FieldError(base, "empty prompt-set name")
        if isinstance(spec, list):  # KnowEdit: a list of {prompt, ground_truth} items per kind
            kind = _kind_items(name, spec, base, source)
            if kind is not None:
                sets.append(kind)
            continue
        if not isinstance(spec, dict):
            raise _FieldError(base, f"expected an object with 'prompt' and 'ground_truth', got "
                                    f"{_type_name(spec)} {_show(spec)}")
        pkey = _one_of(spec, ("prompt", "prompts"), base)
        tkey = _one_of(spec, ("ground_truth", "ground_truths"), base)
        sets.append(_prompt_set(name, spec[pkey], spec[tkey], base + ".", pkey, tkey))
    return sets


def _kind_items(name: str, items: list, base: str, source: str) -> PromptSet | None:
    """KnowEdit's ``[{"prompt": str | [str], "ground_truth": answers}, ...]`` -> one prompt set
    (``None`` when no item is left).  Items without a non-empty answer are skipped with a
    warning, as EasyEdit skips them."""
    prompts: list[str] = []
    answers: list[tuple[str, ...]] = []
    for i, item in enumerate(items):
        where = f"{base}[{i}]"
        if not isinstance(item, dict):
            raise _FieldError(where, f"expected an object with 'prompt' and 'ground_truth', got "
                                     f"{_type_name(item)} {_show(item)}")
        plist = _prompt_list(_get(item, "prompt", f"{where}.prompt"), f"{where}.prompt")
        if not plist:
            raise _FieldError(f"{where}.prompt", "no prompts")
        accepted = _answers(_get(item, "ground_truth", f"{where}.ground_truth"), f"{where}.ground_truth")
        if not accepted:
            log.warning("%s: field '%s.ground_truth': no non-empty answer; item skipped (as EasyEdit does)",
                        source, where)
            continue
        for p in plist:
            prompts.append(p)
            answers.append(accepted)
    return PromptSet(name, tuple(prompts), answers=tuple(answers)) if prompts else None


def _one_of(spec: dict, keys: tuple[str, str], base: str) -> str:
    present = [k for k in keys if k in spec]
    if not present:
        raise _FieldError(f"{base}.{keys[0]}", "missing required field")
    if len(present) > 1:
        raise _FieldError(f"{base}.{keys[0]}", f"give either '{keys[0]}' or '{keys[1]}', not both")
    return present[0]


def _add_set(sets: list[PromptSet], new: PromptSet, field_name: str) -> None:
    if any(s.name == new.name for s in sets):
        raise _FieldError(field_name, f"prompt set {new.name!r} given twice")
    sets.append(new)


# ------------------------------------------------------------------ record parsers


def _parse_prompt_record(rec: dict, default_id: str, source: str) -> EditCase:
    """kedit layout and EasyEdit's flat layout (one parser accepts both)."""
    prompt = _string(_get(rec, "prompt"), "prompt")
    subject = _string(_get(rec, "subject"), "subject")
    target_new = _target(_get(rec, "target_new"), "target_new")
    template = _template(prompt, subject, "prompt", "subject")
    truths = () if rec.get("ground_truth") is None else _answers(rec["ground_truth"], "ground_truth")

    if "rephrase_prompts" in rec and "rephrase_prompt" in rec:
        raise _FieldError("rephrase_prompts", "give either 'rephrase_prompts' or 'rephrase_prompt', not both")
    rkey = "rephrase_prompts" if "rephrase_prompts" in rec else "rephrase_prompt"
    rephrase = () if rec.get(rkey) is None else _prompt_list(rec[rkey], rkey)

    locality = _nested_sets(rec.get("locality"), "locality", source)
    portability = _portability_sets(rec, source)
    for prefix, sets, name in (("locality", locality, "neighborhood"),
                               ("portability", portability, "portability")):
        pkey, tkey = f"{prefix}_prompt", f"{prefix}_ground_truth"
        has_p, has_t = rec.get(pkey) is not None, rec.get(tkey) is not None
        if has_p or has_t:
            if not has_p:
                raise _FieldError(pkey, f"missing required field (given '{tkey}')")
            if not has_t:
                raise _FieldError(tkey, f"missing required field (given '{pkey}')")
            _add_set(sets, _prompt_set(name, rec[pkey], rec[tkey], "", pkey, tkey), pkey)

    attribute = () if rec.get("attribute_prompts") is None else \
        _prompt_list(rec["attribute_prompts"], "attribute_prompts")
    generation = () if rec.get("generation_prompts") is None else \
        _prompt_list(rec["generation_prompts"], "generation_prompts")
    case_id = default_id if rec.get("case_id") is None else _case_id(rec["case_id"])
    ids = {}
    for key in ("relation_id", "target_new_id"):
        if rec.get(key) is not None:
            ids[key] = _string(rec[key], key)
    return EditCase(
        case_id=case_id,
        template=template,
        subject=subject,
        target_new=target_new,
        ground_truth=truths[0] if truths else None,
        ground_truth_aliases=truths,
        rephrase_prompts=rephrase,
        locality=tuple(locality),
        portability=tuple(portability),
        generation_prompts=generation,
        attribute_prompts=attribute,
        source=source,
        **ids,
    )


def _parse_rome_record(rec: dict, default_id: str, source: str) -> EditCase:
    """The original CounterFact release (``requested_rewrite`` ...)."""
    rw = _get(rec, "requested_rewrite")
    if not isinstance(rw, dict):
        raise _FieldError("requested_rewrite", f"expected an object, got {_type_name(rw)} {_show(rw)}")
    prompt = _string(_get(rw, "prompt", "requested_rewrite.prompt"), "requested_rewrite.prompt")
    subject = _string(_get(rw, "subject", "requested_rewrite.subject"), "requested_rewrite.subject")

    def target(key: str) -> str:
        base = f"requested_rewrite.{key}"
        value = _get(rw, key, base)
        if not isinstance(value, dict):
            raise _FieldError(base, f"expected an object with 'str', got {_type_name(value)} {_show(value)}")
        return _target(_get(value, "str", base + ".str"), base + ".str")

    target_new = target("target_new")
    target_true = target("target_true")
    template = _template(prompt, subject, "requested_rewrite.prompt", "requested_rewrite.subject")

    def plist(key: str) -> tuple[str, ...]:
        return () if rec.get(key) is None else _prompt_list(rec[key], key)

    neighborhood = plist("neighborhood_prompts")
    locality = (PromptSet("neighborhood", neighborhood, (target_true,) * len(neighborhood)),) \
        if neighborhood else ()
    portability = _portability_sets(rec, source)
    if rec.get("alternative_subject") is not None:  # EasyEdit's CounterFact subject replace
        alias = _string(rec["alternative_subject"], "alternative_subject").strip()
        if not alias:
            raise _FieldError("alternative_subject", "empty subject")
        _add_set(portability, PromptSet("subject_replace", (template.replace(PLACEHOLDER, alias, 1),),
                                        (target_new,)), "alternative_subject")
    case_id = default_id if rec.get("case_id") is None else _case_id(rec["case_id"])
    return EditCase(
        case_id=case_id,
        template=template,
        subject=subject,
        target_new=target_new,
        ground_truth=target_true,
        rephrase_prompts=plist("paraphrase_prompts"),
        locality=locality,
        portability=tuple(portability),
        generation_prompts=plist("generation_prompts"),
        attribute_prompts=plist("attribute_prompts"),
        relation_id=str(rw["relation_id"]) if rw.get("relation_id") is not None else None,
        target_new_id=str(rw["target_new"]["id"]) if rw["target_new"].get("id") is not None else None,
        source=source,
    )


def _parse_zsre_record(rec: dict, default_id: str, source: str) -> EditCase:
    """zsRE as split by MEND (``src``, ``alt``, ``answers``, ``loc`` ...)."""
    prompt = _string(_get(rec, "src"), "src")
    subject = _string(_get(rec, "subject"), "subject")
    target_new = _target(_get(rec, "alt"), "alt")
    template = _template(prompt, subject, "src", "subject")
    answers = rec.get("answers")
    truths: tuple[str, ...] = ()
    if answers is not None:
        answers = _string_list(answers, "answers")
        if not answers:
            raise _FieldError("answers", "empty list")
        truths = _answers(answers, "answers")
    rephrase = () if rec.get("rephrase") is None else _prompt_list(rec["rephrase"], "rephrase")
    locality: tuple[PromptSet, ...] = ()
    has_loc, has_ans = rec.get("loc") is not None, rec.get("loc_ans") is not None
    if has_loc or has_ans:
        if not has_loc:
            raise _FieldError("loc", "missing required field (given 'loc_ans')")
        if not has_ans:
            raise _FieldError("loc_ans", "missing required field (given 'loc')")
        locality = (_prompt_set("nq", rec["loc"], rec["loc_ans"], "", "loc", "loc_ans"),)
    portability = _portability_sets(rec, source)
    # EasyEdit's zsRE portability files: the edited fact asked about the subject's alias,
    # and the inverse relation (whose answer is the subject).
    for key, name, answer in (("alter_subject_question", "subject_replace", target_new),
                              ("inverse question", "inverse_relation", subject.strip())):
        if rec.get(key) is not None:
            _add_set(portability, _prompt_set(name, rec[key], answer, "", key, key), key)
    case_id = default_id if rec.get("case_id") is None else _case_id(rec["case_id"])
    return EditCase(
        case_id=case_id,
        template=template,
        subject=subject,
        target_new=target_new,
        ground_truth=truths[0] if truths else None,
        ground_truth_aliases=truths,
        rephrase_prompts=rephrase,
        locality=locality,
        portability=tuple(portability),
        source=source,
    )


def _parse_wikibio_record(rec: dict, default_id: str, source: str) -> EditCase:
    """KnowEdit's WikiBio: ``text`` (the prompt), ``labels`` (the new continuation),
    ``concept`` (the subject, which the text holds), ``locality`` kinds."""
    text = _string(_get(rec, "text"), "text")
    concept = _string(_get(rec, "concept"), "concept")
    labels = _target(_get(rec, "labels"), "labels")
    template = _template(text, concept, "text", "concept")
    case_id = default_id if rec.get("case_id") is None else _case_id(rec["case_id"])
    return EditCase(
        case_id=case_id,
        template=template,
        subject=concept,
        target_new=labels,
        locality=tuple(_nested_sets(rec.get("locality"), "locality", source)),
        portability=tuple(_portability_sets(rec, source)),
        source=source,
    )


def _portability_sets(rec: dict, source: str) -> list[PromptSet]:
    """``portability``: kedit's / KnowEdit's map of sets, or EasyEdit's one-hop object
    ``{"Recalled Relation", "New Question", "New Answer"}`` (-> set "one_hop")."""
    value = rec.get("portability")
    if isinstance(value, dict) and ("New Question" in value or "New Answer" in value):
        for key in ("New Question", "New Answer"):
            _get(value, key, f"portability.{key}")
        return [_prompt_set("one_hop", value["New Question"], value["New Answer"], "portability.",
                            "New Question", "New Answer")]
    return _nested_sets(value, "portability", source)


_PARSERS = {
    "kedit": _parse_prompt_record,
    "easyedit": _parse_prompt_record,
    "knowedit": _parse_prompt_record,
    "rome": _parse_rome_record,
    "zsre": _parse_zsre_record,
    "wikibio": _parse_wikibio_record,
}


def _has_kinds(rec: dict) -> bool:
    """KnowEdit's sign: a ``portability`` / ``locality`` map whose values are lists."""
    return any(isinstance(rec.get(k), dict) and any(isinstance(v, list) for v in rec[k].values())
               for k in ("portability", "locality"))


def _detect(rec: dict) -> str:
    """The layout a single record looks like: "rome", "zsre", "wikibio", "knowedit",
    "easyedit" or "kedit"."""
    if "requested_rewrite" in rec:
        return "rome"
    if "prompt" not in rec and ("src" in rec or "alt" in rec):
        return "zsre"
    if "prompt" not in rec and ("text" in rec or "labels" in rec or "concept" in rec):
        return "wikibio"
    if _has_kinds(rec):
        return "knowedit"
    if any(k in rec for k in _FLAT_KEYS):
        return "easyedit"
    return "kedit"


def _family(layout: str) -> str:
    return "prompt" if layout in ("kedit", "easyedit", "knowedit") else layout


def case_from_dict(record: dict, fmt: str = "auto", *, case_id: str = "case",
                   source: str = "<record>") -> EditCase:
    """Build one case from a record of any layout (``case_id`` is used when it has none).

    Raises :class:`CasesError` (message ``"<source>: field 'x': ..."``).
    """
    _check_fmt(fmt)
    if not isinstance(record, dict):
        raise CasesError(f"{source}: expected a JSON object, got {_type_name(record)}")
    layout = _detect(record) if fmt == "auto" else fmt
    try:
        return _PARSERS[layout](record, case_id, source)
    except _FieldError as e:
        raise CasesError(_message(source, e.field, e.message)) from None


# ----------------------------------------------------------------------- reading


def _message(where: str, field_name: str | None, text: str) -> str:
    msg = f"{where}: field '{field_name}': {text}" if field_name else f"{where}: {text}"
    return " ".join(msg.splitlines())  # one line, whatever the input held


def _check_fmt(fmt: str) -> None:
    if fmt not in FORMATS:
        raise CasesError(f"unknown case format {fmt!r} (choose from {', '.join(FORMATS)})")


def _json_reason(err: json.JSONDecodeError) -> str:
    return f"{err.msg} (column {err.colno})"


def _iter_records(path: Path) -> tuple[bool, Iterator[tuple[int, str, Any]]]:
    """Open a case file: (is_array, iterator of (number, "path:where", record-or-error)).

    For JSONL the number is the line number; for a JSON array the 1-based record
    index.  A line that is not JSON yields a ``CasesError`` in place of the record.
    """
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise CasesError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise CasesError(f"{name}: is a directory, not a case file") from None
    except UnicodeDecodeError as e:
        raise CasesError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise CasesError(f"{name}: cannot read ({e.strerror or e})") from None

    stripped = text.lstrip()
    if not stripped:
        raise CasesError(f"{name}: no cases (the file is empty)")

    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CasesError(f"{name}:{e.lineno}: not JSON: {_json_reason(e)}") from None
        if not isinstance(data, list):  # pragma: no cover - '[' always parses to a list
            raise CasesError(f"{name}: expected a JSON array of cases")

        def array_records() -> Iterator[tuple[int, str, Any]]:
            for i, rec in enumerate(data, start=1):
                yield i, f"{name}:record {i}", rec

        return True, array_records()

    def line_records() -> Iterator[tuple[int, str, Any]]:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{name}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                reason = _json_reason(e)
                if lineno == 1 and line.strip() == "{":
                    reason += "; the file looks like one pretty-printed JSON object, expected " \
                              "one object a line (JSONL) or a JSON array"
                yield lineno, where, CasesError(f"{where}: not JSON: {reason}")
                continue
            yield lineno, where, rec

    return False, line_records()


def _load(path: str | os.PathLike, fmt: str, skip_invalid: bool) -> tuple[list[EditCase], str]:
    _check_fmt(fmt)
    path = Path(path)
    is_array, records = _iter_records(path)
    stem = path.stem
    family = None if fmt == "auto" else _family(fmt)
    flat_seen = kinds_seen = False
    cases: list[EditCase] = []
    seen: dict[str, str] = {}  # case_id -> where first seen ("line 3" / "record 3")
    skipped = 0

    for number, where, rec in records:
        try:
            if isinstance(rec, CasesError):
                raise rec
            if not isinstance(rec, dict):
                raise CasesError(f"{where}: expected a JSON object, got {_type_name(rec)} {_show(rec)}")
            layout = _detect(rec)
            if family is None:  # auto: the first record decides the layout of the file
                family = _family(layout)
            flat_seen = flat_seen or layout == "easyedit"
            kinds_seen = kinds_seen or layout == "knowedit"
            parser = _parse_prompt_record if family == "prompt" else _PARSERS[family]
            try:
                case = parser(rec, f"{stem}-{number}", where)
            except _FieldError as e:
                raise CasesError(_message(where, e.field, e.message)) from None
            here = f"record {number}" if is_array else f"line {number}"
            if case.case_id in seen:
                raise CasesError(_message(
                    where, "case_id",
                    f"duplicate case_id {case.case_id!r} (first at {seen[case.case_id]}, again at {here})"))
            seen[case.case_id] = here
            cases.append(case)
        except CasesError as e:
            if not skip_invalid:
                raise
            skipped += 1
            log.warning("skipping invalid case: %s", e)

    if not cases:
        if skipped:
            raise CasesError(f"{path}: no valid cases ({skipped} invalid records skipped)")
        raise CasesError(f"{path}: no cases (the file holds no records)")
    if fmt != "auto":
        layout_name = fmt
    elif family == "prompt":
        layout_name = "knowedit" if kinds_seen else "easyedit" if (is_array or flat_seen) else "kedit"
    else:
        layout_name = family
    return cases, layout_name


def load_cases(path: str | os.PathLike, fmt: str = "auto", *,
               skip_invalid: bool = False) -> list[EditCase]:
    """Read every case of a file, in file order.

    ``fmt`` is one of :data:`FORMATS`; ``"auto"`` tells a JSON array from JSONL by
    the first character and the layout from the first record's keys.  All records
    are checked before anything is returned; the first bad one (in file order)
    raises :class:`CasesError`.  With ``skip_invalid=True`` bad records (and
    duplicate ids) are logged as warnings on the ``kedit.data.cases`` logger and left
    out instead; a file that cannot be read or parsed as a whole still raises.
    """
    return _load(path, fmt, skip_invalid)[0]


def validate_cases(path: str | os.PathLike, fmt: str = "auto") -> tuple[int, str]:
    """Check a case file: (number of cases, layout) or :class:`CasesError`.

    The layout is "kedit", "easyedit", "knowedit", "rome", "zsre" or "wikibio" (``fmt``
    itself if given).
    """
    cases, layout = _load(path, fmt, skip_invalid=False)
    return len(cases), layout


# ----------------------------------------------------------------------- writing


def write_cases(cases: Iterable[EditCase], path: str | os.PathLike) -> Path:
    """Write cases in the kedit JSONL layout, atomically (temp file + ``os.replace``).

    Raises :class:`CasesError` before writing anything when two cases share an id.
    Returns the path written.
    """
    path = Path(path)
    lines = []
    seen: dict[str, int] = {}
    for i, case in enumerate(cases, start=1):
        if case.case_id in seen:
            raise CasesError(
                f"{path}: duplicate case_id {case.case_id!r} (cases {seen[case.case_id]} and {i})")
        seen[case.case_id] = i
        lines.append(json.dumps(case.to_dict(), ensure_ascii=False))
    write_text(path, "".join(line + "\n" for line in lines))
    return path


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``template`` has one ``{}`` where ``subject`` goes."""

    case_id: str
    template: str
    subject: str
    target_new: str
    target_true: str | None = None

    @property
    def prompt(self) -> str:
        return self.template.replace("{}", self.subject, 1)

    @classmethod
    def from_case(cls, case: EditCase) -> EditRequest:
        return cls(case.case_id, case.template, case.subject, case.target_new, case.ground_truth)
