"""Several workers' answers as one (PPROF_MULTIPROC_DIR, see `multiproc`): profiles merged by
`merge`, texts one after the other, and headers that name the workers in and out."""

from __future__ import annotations

import re
from collections.abc import Sequence

from asgi_pprof.asgi import Answer, error, text
from asgi_pprof.asgi import profile as profile_answer
from asgi_pprof.merge import DecodedProfile, MergeError, decode, merge

WORKERS_HEADER = "x-pprof-workers"  # the pids whose answers were merged
FAILED_HEADER = "x-pprof-workers-failed"  # `pid: why` of each that was asked and is missing


def combine(
    answers: Sequence[tuple[int, Answer]],
    failures: Sequence[tuple[int, str]],
    notes: Sequence[str] = (),
) -> Answer:
    """One answer from every worker's (this worker's first): profiles merged, texts one after
    the other. A worker that answered an error, or a profile that cannot be merged, joins
    `failures`; both headers name who is in and who is out. If nobody answered 200, this
    worker's own answer, or a 503."""
    failed = list(failures)
    good = []
    for pid, answer in answers:
        if answer.status == 200:
            good.append((pid, answer))
        else:
            message = answer.body[:300].decode("utf-8", "replace").strip()
            failed.append((pid, f"answered {answer.status}: {message}"))
    failed.sort()
    included = [pid for pid, _ in good]
    if not good:
        combined = answers[0][1] if answers else error(503, "no worker answered")
    elif _content_type(good[0][1]).startswith("text/"):
        combined = _texts(good, failed, notes)
    else:
        combined, included = _profiles(good, failed, notes)
    combined.headers.append((WORKERS_HEADER, " ".join(str(pid) for pid in included)))
    if failed:
        reasons = "; ".join(f"{pid}: {_one_line(reason)}" for pid, reason in failed)
        combined.headers.append((FAILED_HEADER, reasons))
    return combined


def _content_type(answer: Answer) -> str:
    return dict(answer.headers).get("content-type", "")


def _one_line(text: str) -> str:
    """Fit for a header value: one line of latin-1."""
    return " ".join(text.split()).encode("latin-1", "replace").decode("latin-1")


def _texts(
    good: list[tuple[int, Answer]], failed: list[tuple[int, str]], notes: Sequence[str]
) -> Answer:
    """debug=1, debug=2: each worker's text under a `# pid N` line, after what is missing."""
    parts = [f"# pid {pid}: no answer: {_one_line(reason)}\n" for pid, reason in failed]
    parts += [f"# {_one_line(note)}\n" for note in notes]
    for pid, answer in good:
        parts.append(f"# pid {pid}\n" + answer.body.decode("utf-8", "replace"))
    return text("\n".join(parts))


def _profiles(
    good: list[tuple[int, Answer]], failed: list[tuple[int, str]], notes: Sequence[str]
) -> tuple[Answer, list[int]]:
    """The merged profile, and the pids in it."""
    decoded: list[tuple[int, DecodedProfile]] = []
    for pid, answer in good:
        try:
            profile = decode(answer.body)
            if decoded and profile.sample_types != decoded[0][1].sample_types:
                raise MergeError(f"sample types {profile.sample_types}, not those of the others")
        except (MergeError, ValueError, OSError, EOFError, IndexError) as problem:
            failed.append((pid, f"its profile could not be merged: {problem}"))
            continue
        decoded.append((pid, profile))
    if not decoded:
        reasons = "; ".join(reason for _, reason in failed)
        return error(502, f"no worker's profile could be read: {reasons}"), []
    pids = " ".join(str(pid) for pid, _ in decoded)
    comments = [f"merged from {len(decoded)} workers, each sample labelled with its pid: {pids}"]
    comments += [f"worker {pid} is missing: {reason}" for pid, reason in failed]
    comments += notes
    # Named as the workers name theirs (heap, heap-delta...): `go tool pprof` shows the name.
    name = _attachment_name(good[0][1])
    return profile_answer(name, merge(decoded, comments)), [pid for pid, _ in decoded]


def _attachment_name(answer: Answer) -> str:
    disposition = dict(answer.headers).get("content-disposition", "")
    match = re.search(r'filename="([^"]*)"', disposition)
    return match[1] if match else "profile"
