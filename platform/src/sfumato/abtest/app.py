"""`sfumato abtest`: a blind pairwise comparison page for two exported models.

Each trial picks a condition (a class, a prompt from a file, or none) and a seed, generates one
image with each model from the same noise, and shows them side by side in an order drawn in
balanced blocks (every two trials, each model is once on the left), with nothing that says which
model drew which: the page and the image URLs carry only the trial's random id. The vote (left,
right, tie, skip) is recorded with the rater's name, the time, the condition, the seeds, both
model ids and both images' SHA-256 (votes.VoteLog: fsynced before the page hears it counted), and
the images are kept, content-addressed, in the folder's images/ (so the votes become training
pairs: sfumato.data.pairs). When both sides are the same model (a preference-collection round
on one model's samples), the right image is drawn from another seed.

It is a FastAPI app served by uvicorn in one process (one writer of the vote log). A token
(--token-env) guards everything but /healthz: a bearer header for scripts, or a cookie that
/login?token=... sets for a browser.
"""

from __future__ import annotations

import hashlib
import html
import io
import os
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from sfumato.config import check_guidance_interval
from sfumato.data.votes import CHOICES, VoteLog, results, votes_table, winner
from sfumato.layout import atomic_write

COOKIE = "sfumato_abtest_token"
SAME_MODEL_SEED_OFFSET = 1_000_003
MAX_PENDING = 1024


@dataclass
class Arm:
    """One side of the comparison: a model id (recorded in the votes) and what generates."""

    id: str
    source: str
    backend: object  # sfumato.serve.backends.TorchBackend (or anything with info(), generate(), prompt_tokens())


@dataclass
class Trial:
    id: str
    condition: str
    seed_left: int
    seed_right: int
    left: Arm
    right: Arm
    images: dict  # side -> PNG bytes
    hashes: dict  # side -> sha256 hex


def load_arm(spec: str, device: str = "cpu") -> Arm:
    """`[NAME=]EXPORT_DIR[+LORA_DIR]`: an `sfumato export` folder (optionally with a LoRA adapter
    folder), recorded in the votes as NAME (default: the folder's path)."""
    from sfumato.serve.backends import load_backend

    name, _, rest = spec.rpartition("=") if "=" in spec else ("", "", spec)
    export, _, lora = rest.partition("+")
    backend = load_backend(Path(export), "torch", device, Path(lora) if lora else None)
    source = str(Path(export).resolve()) + (f"+{Path(lora).resolve()}" if lora else "")
    return Arm(name or rest, source, backend)


def conditions_for(arms: list[Arm], conditions_file: Path | None) -> list[str]:
    """The conditions trials draw from: the file's lines (prompts, or class names), else the
    models' classes; [""] for unconditional models. Every condition must suit both models: a
    prompt must be one either model reads whole (sfumato.serve.prompts, as the endpoint checks)."""
    infos = [arm.backend.info() for arm in arms]
    kinds = {info.conditioning for info in infos}
    if len(kinds) != 1:
        raise ValueError(f"the two models are conditioned differently ({sorted(kinds)}): compare like with like")
    kind = kinds.pop()
    if conditions_file is not None:
        text = Path(conditions_file).read_text().splitlines()
        numbers = [n for n, line in enumerate(text, 1) if line.strip()]
        lines = [text[n - 1].strip() for n in numbers]
        if not lines:
            raise ValueError(f"{conditions_file} lists no condition")
    elif kind == "class":
        lines = infos[0].class_names
    elif kind == "text":
        raise ValueError("text models need --conditions FILE: the prompts to compare them on, one a line")
    else:
        lines = [""]
    if kind == "class":
        for info, arm in zip(infos, arms):
            unknown = [c for c in lines if c not in info.class_names]
            if unknown:
                raise ValueError(f"{arm.id} has no class {unknown[0]!r} (its classes: {info.class_names})")
    elif kind == "text":
        from sfumato.serve.prompts import MAX_PROMPT_CHARS, prompt_problem

        for arm in arms:
            tokens = arm.backend.prompt_tokens()
            for number, line in zip(numbers, lines):
                problem = prompt_problem(line, MAX_PROMPT_CHARS, tokens)
                if problem:
                    raise ValueError(f"{conditions_file} line {number}: the prompt {problem} for {arm.id}")
    elif kind == "none" and lines != [""]:
        raise ValueError("the models are unconditional: --conditions does not apply")
    return lines


class VoteRequest(BaseModel):
    """POST /api/vote (module level: FastAPI resolves the annotation by name)."""

    model_config = ConfigDict(extra="forbid")
    trial: str = Field(pattern=r"^[0-9a-f]{32}$")
    choice: str = Field(pattern="^(" + "|".join(CHOICES) + ")$")
    rater: str = Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")


class ABTest:
    """Trials, votes and results of one A/B test folder."""

    def __init__(
        self,
        folder: Path,
        arms: list[Arm],
        conditions: list[str],
        planned: int = 400,
        steps: int = 25,
        guidance_scale: float = 3.0,
        seed: int | None = None,
        guidance_interval: tuple[float, float] | None = None,
    ):
        """`guidance_interval` (lo, hi): guide only at noise levels in it, as Serve's request does."""
        if len(arms) != 2:
            raise ValueError("an A/B test compares two models")
        if guidance_interval is not None:
            try:
                check_guidance_interval(guidance_interval)
            except ValueError as err:
                raise ValueError(f"guidance_interval {err}") from None
        self.folder = Path(folder)
        self.images_dir = self.folder / "images"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.log = VoteLog(self.folder / "votes.jsonl")
        self.arms, self.conditions, self.planned = arms, conditions, planned
        self.steps, self.guidance_scale, self.guidance_interval = steps, guidance_scale, guidance_interval
        self.same_model = arms[0].source == arms[1].source
        self.rng = np.random.default_rng(seed if seed is not None else secrets.randbits(63))
        self._sides: list[bool] = []
        self._pending: OrderedDict[str, Trial] = OrderedDict()
        self._lock, self._generate_lock = threading.Lock(), threading.Lock()
        votes, _ = self.log.read()
        self.counted = sum(v["choice"] != "skip" for v in votes)

    def _a_on_left(self) -> bool:
        """Balanced blocks of two: each model once on the left, in a random order."""
        if not self._sides:
            self._sides = [True, False] if self.rng.random() < 0.5 else [False, True]
        return self._sides.pop(0)

    def new_trial(self) -> Trial:
        with self._lock:
            condition = self.conditions[int(self.rng.integers(len(self.conditions)))]
            seed = int(self.rng.integers(0, 2**31 - SAME_MODEL_SEED_OFFSET - 1))
            a_left = self._a_on_left()
        left, right = (self.arms[0], self.arms[1]) if a_left else (self.arms[1], self.arms[0])
        seeds = {"left": seed, "right": seed + SAME_MODEL_SEED_OFFSET if self.same_model else seed}
        images, hashes = {}, {}
        for side, arm in (("left", left), ("right", right)):
            images[side] = self._draw(arm, condition, seeds[side])
            hashes[side] = hashlib.sha256(images[side]).hexdigest()
            path = self.images_dir / f"{hashes[side]}.png"
            if not path.exists():
                atomic_write(path, images[side])
        trial = Trial(uuid.uuid4().hex, condition, seeds["left"], seeds["right"], left, right, images, hashes)
        with self._lock:
            self._pending[trial.id] = trial
            while len(self._pending) > MAX_PENDING:
                self._pending.popitem(last=False)
        return trial

    def _draw(self, arm: Arm, condition: str, seed: int) -> bytes:
        from PIL import Image

        from sfumato.serve.backends import Job

        info = arm.backend.info()
        job = Job(
            id=uuid.uuid4().hex,
            seed=seed,
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            guidance_interval=self.guidance_interval,
            num_images=1,
            sampler=info.default_sampler,
            width=info.default_size_px,
            height=info.default_size_px,
            prompt=condition if info.conditioning == "text" else None,
            class_label=condition if info.conditioning == "class" else None,
        )
        with self._generate_lock:
            image = arm.backend.generate([job])[0][0]
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "PNG")
        return buffer.getvalue()

    def image(self, trial_id: str, side: str) -> bytes | None:
        with self._lock:
            trial = self._pending.get(trial_id)
        return None if trial is None else trial.images[side]

    def vote(self, trial_id: str, choice: str, rater: str) -> dict | None:
        """Records the vote of a pending trial (each trial takes one); None: no such trial."""
        with self._lock:
            trial = self._pending.pop(trial_id, None)
        if trial is None:
            return None
        record = {
            "vote": uuid.uuid4().hex,
            "time": time.time(),
            "rater": rater,
            "trial": trial.id,
            "condition": trial.condition,
            "seed_left": trial.seed_left,
            "seed_right": trial.seed_right,
            "left_model": trial.left.id,
            "right_model": trial.right.id,
            "left_image": trial.hashes["left"],
            "right_image": trial.hashes["right"],
            "choice": choice,
            "winner": winner(choice, trial.left.id, trial.right.id),
        }
        self.log.append(record)
        with self._lock:
            self.counted += choice != "skip"
        return record

    def results(self) -> dict:
        votes, damaged = self.log.read()
        return results(votes, self.planned, damaged)


def build_app(test: ABTest, token: str = ""):
    from fastapi import FastAPI, Query
    from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

    from sfumato.serve.guard import answer_invalid_requests, require_token, token_matches

    app = FastAPI(title="sfumato A/B test", description="Blind pairwise comparison of two models.")
    answer_invalid_requests(app)
    # A browser cannot send a header with an <img> request: /login sets the token as a cookie.
    require_token(
        app,
        token,
        open_paths=("/healthz", "/login"),
        cookie=COOKIE,
        how="open /login?token=... or send a bearer header",
    )

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/login")
    def login(token_given: str = Query("", alias="token", max_length=1024)):
        if token and not token_matches(token_given, token):
            return JSONResponse({"detail": "the token is not valid"}, 403)
        response = RedirectResponse("/", 303)
        if token:
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE

    @app.post("/api/trial")
    def trial() -> dict:
        t = test.new_trial()
        return {
            "trial": t.id,
            "condition": t.condition,
            "left": f"/api/image/{t.id}/left",
            "right": f"/api/image/{t.id}/right",
            "votes": test.counted,
            "planned": test.planned,
        }

    @app.get("/api/image/{trial_id}/{side}")
    def image(trial_id: str, side: str):
        if side not in ("left", "right"):
            return JSONResponse({"detail": "side is left or right"}, 404)
        data = test.image(trial_id, side)
        if data is None:
            return JSONResponse({"detail": "no open trial with that id (voted on, or too old)"}, 404)
        return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.post("/api/vote")
    def vote(body: VoteRequest):
        record = test.vote(body.trial, body.choice, body.rater)
        if record is None:
            return JSONResponse({"detail": "no open trial with that id (voted on already, or too old)"}, 409)
        return {"recorded": True, "votes": test.counted, "planned": test.planned}

    @app.get("/api/results")
    def results_json() -> dict:
        return test.results()

    @app.get("/api/votes.parquet")
    def votes_parquet():
        import pyarrow.parquet as pq

        votes, _ = test.log.read()
        buffer = io.BytesIO()
        pq.write_table(votes_table(votes), buffer)
        return Response(
            buffer.getvalue(),
            media_type="application/vnd.apache.parquet",
            headers={"Content-Disposition": 'attachment; filename="votes.parquet"'},
        )

    @app.get("/results", response_class=HTMLResponse)
    def results_page() -> str:
        return render_results(test.results())

    return app


def _rate(entry: dict) -> str:
    if entry["win_rate"] is None:
        return "<td>-</td><td>-</td>"
    low, high = entry["ci95"]
    return f"<td>{entry['win_rate']:.1%}</td><td>{low:.1%} – {high:.1%}</td>"


def render_results(found: dict) -> str:
    """The results page: win rates with 95% intervals, overall and per condition."""
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(m)}</td><td>{e['wins']}</td><td>{e['ties']}</td><td>{e['losses']}</td>{_rate(e)}</tr>"
        for m, e in found["overall"]["models"].items()
    )
    per = "".join(
        f"<tr><td>{esc(c or '(none)')}</td><td>{esc(m)}</td><td>{e['votes']}</td>{_rate(e)}</tr>"
        for c, tally in found["per_condition"].items()
        for m, e in tally["models"].items()
    )
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>A/B results</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}</style>
</head><body><h1>A/B test results</h1>
<p id="summary">{found["overall"]["votes"]} votes counted ({found["skips"]} skipped, {found["overall"]["ties"]} ties);
{found["remaining"]} remaining of the {found["planned"]} planned.</p>
<h2>Overall</h2><table id="overall"><tr><th>model</th><th>wins</th><th>ties</th><th>losses</th><th>win rate</th><th>95% interval</th></tr>{rows}</table>
<h2>Per condition</h2><table id="per-condition"><tr><th>condition</th><th>model</th><th>votes</th><th>win rate</th><th>95% interval</th></tr>{per}</table>
<p>A tie counts half a win; intervals are Wilson's. <a href="/api/votes.parquet">votes.parquet</a> · <a href="/">vote</a></p>
</body></html>"""  # noqa: E501 (markup kept on its lines)


PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Which do you prefer?</title>
<style>
body{font-family:sans-serif;margin:2em;max-width:48em}
.pair{display:flex;gap:2em;margin:1em 0}
.pair img{width:256px;height:256px;image-rendering:pixelated;border:1px solid #999;background:#eee}
button{font-size:1.1em;margin-right:.5em;padding:.3em 1em}
</style></head><body>
<h1>Which image do you prefer?</h1>
<p><label>Your name: <input id="rater" maxlength="64" autocomplete="name"></label></p>
<p id="condition"></p>
<div class="pair"><img id="left" alt="left image"><img id="right" alt="right image"></div>
<p><button id="vote-left">Left</button><button id="vote-tie">Tie</button><button id="vote-right">Right</button><button id="vote-skip">Skip</button></p>
<p id="status"></p>
<p><span id="count">0</span> votes so far · <a href="/results">results</a></p>
<script>
let trial = null;
const $ = (id) => document.getElementById(id);
$("rater").value = localStorage.getItem("rater") || "";
function setButtons(on) { for (const c of ["left", "tie", "right", "skip"]) $("vote-" + c).disabled = !on; }
async function next() {
  setButtons(false);
  $("status").textContent = "drawing the next pair...";
  const r = await fetch("/api/trial", {method: "POST"});
  if (!r.ok) { $("status").textContent = "could not get a pair: " + r.status; return; }
  const t = await r.json();
  trial = t.trial;
  $("condition").textContent = t.condition ? "Asked for: " + t.condition : "";
  $("count").textContent = t.votes;
  await Promise.all([["left", t.left], ["right", t.right]].map(([id, url]) => new Promise((done) => {
    $(id).onload = done; $(id).onerror = done; $(id).src = url; })));
  $("status").textContent = "";
  setButtons(true);
}
async function vote(choice) {
  const rater = $("rater").value.trim();
  if (!rater) { $("status").textContent = "enter your name first"; $("rater").focus(); return; }
  localStorage.setItem("rater", rater);
  setButtons(false);
  const r = await fetch("/api/vote", {method: "POST", headers: {"content-type": "application/json"},
                                      body: JSON.stringify({trial, choice, rater})});
  if (!r.ok) { $("status").textContent = "the vote was not recorded: " + r.status; setButtons(true); return; }
  const v = await r.json();
  $("count").textContent = v.votes;
  await next();
}
for (const c of ["left", "tie", "right", "skip"]) $("vote-" + c).onclick = () => vote(c);
next();
</script></body></html>"""  # noqa: E501 (markup kept on its lines)


def run_abtest(
    arms: list[str],
    out: Path,
    conditions_file: Path | None = None,
    planned: int = 400,
    steps: int = 25,
    guidance_scale: float = 3.0,
    host: str = "127.0.0.1",
    port: int = 8300,
    token_env: str | None = None,
    seed: int | None = None,
    guidance_interval: tuple[float, float] | None = None,
) -> None:
    """`sfumato abtest`: load both models and serve the page until interrupted."""
    import uvicorn

    loaded = [load_arm(spec) for spec in arms]
    if loaded[0].id == loaded[1].id:
        loaded[1].id += "#2"
    token = os.environ.get(token_env, "") if token_env else ""
    if token_env and not token:
        raise ValueError(f"--token-env {token_env}: that environment variable is unset or empty")
    test = ABTest(
        out, loaded, conditions_for(loaded, conditions_file), planned, steps, guidance_scale, seed, guidance_interval
    )
    print(
        f"A/B test of {loaded[0].id} and {loaded[1].id} on {len(test.conditions)} condition(s): "
        f"http://{host}:{port}/ (results: /results); votes in {test.log.path}",
        flush=True,
    )
    uvicorn.run(build_app(test, token), host=host, port=port, log_level="warning")
