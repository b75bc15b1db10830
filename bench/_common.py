"""Small helpers shared by the benchmarks: measured child processes, JSON result lines, synthetic corpora.

Every measurement runs in its own child process so that its peak RSS is its own: the rusage of exactly
that child comes back from ``os.wait4`` (Linux reports ``ru_maxrss`` in KiB), with no polling that could
miss a short spike and no mixing with other children of the benchmark process.

The synthetic instruction corpus is deterministic for a given seed and streamed to disk one record at
a time, so generating a million records needs no more memory than generating a thousand.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")

# ----------------------------------------------------------------------------------------------------
# Measured child processes


@dataclass
class ChildResult:
    """What one measured child process did: exit code, wall and CPU seconds, its own peak RSS, output."""

    cmd: list[str]
    returncode: int
    seconds: float
    cpu_seconds: float
    peak_rss_mb: float
    stdout: str
    stderr: str

    def check(self, what: str) -> ChildResult:
        """Return self, or raise with the tail of stderr when the child failed."""
        if self.returncode != 0:
            tail = "\n".join(self.stderr.splitlines()[-30:])
            raise RuntimeError(
                f"{what} failed with exit code {self.returncode}: {' '.join(self.cmd)}\n{tail}"
            )
        return self


def _maxrss_mb(ru_maxrss: int) -> float:
    # Linux reports KiB, macOS bytes.
    return round(ru_maxrss / (1024 * 1024) if sys.platform == "darwin" else ru_maxrss / 1024, 1)


def run_children(cmds: Sequence[Sequence[str]], *, parallel: int = 1, cwd: Path = ROOT,
                 env: dict[str, str] | None = None) -> tuple[float, list[ChildResult]]:
    """Run `cmds`, at most `parallel` at a time; return (total wall seconds, one result per command).

    Each child's stdout/stderr go to files in a temporary directory (no pipe can fill up and stall
    it) and each child is reaped with ``os.wait4(pid)``, whose rusage is that child's alone (its own
    peak RSS and CPU time).
    """
    full_env = {**os.environ, **(env or {})}
    cmd_of = [[str(a) for a in c] for c in cmds]
    pending = list(enumerate(cmd_of))
    running: dict[int, tuple[int, subprocess.Popen[bytes], float]] = {}
    results: dict[int, ChildResult] = {}
    with tempfile.TemporaryDirectory(prefix="bench-child-") as logs:
        def log_path(index: int, stream: str) -> Path:
            return Path(logs) / f"{index}.{stream}"

        t0 = time.perf_counter()
        while pending or running:
            while pending and len(running) < max(1, parallel):
                index, cmd = pending.pop(0)
                flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                out_fd = os.open(log_path(index, "out"), flags, 0o600)
                err_fd = os.open(log_path(index, "err"), flags, 0o600)
                try:
                    started = time.perf_counter()
                    proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=out_fd, stderr=err_fd)
                finally:
                    os.close(out_fd)
                    os.close(err_fd)
                running[proc.pid] = (index, proc, started)
            if len(running) == 1 and not pending:
                pid, status, usage = os.wait4(next(iter(running)), 0)
            else:
                # Reap only our own children (never wait4(-1): that could steal another Popen's child).
                for candidate in list(running):
                    pid, status, usage = os.wait4(candidate, os.WNOHANG)
                    if pid:
                        break
                else:
                    time.sleep(0.01)
                    continue
            index, proc, started = running.pop(pid)
            seconds = time.perf_counter() - started
            proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
            results[index] = ChildResult(
                cmd=cmd_of[index], returncode=proc.returncode, seconds=round(seconds, 3),
                cpu_seconds=round(usage.ru_utime + usage.ru_stime, 3),
                peak_rss_mb=_maxrss_mb(usage.ru_maxrss),
                stdout=log_path(index, "out").read_text(encoding="utf-8", errors="replace"),
                stderr=log_path(index, "err").read_text(encoding="utf-8", errors="replace"),
            )
        total = round(time.perf_counter() - t0, 3)
    return total, [results[i] for i in range(len(cmd_of))]


@contextmanager
def scratch_dir(prefix: str, keep: bool = False) -> Iterator[Path]:
    """A fresh temporary folder for one benchmark run: removed afterwards unless `keep` (then its path is
    printed, to inspect the run's data)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield tmp
    finally:
        if keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def run_child(cmd: Sequence[str], *, cwd: Path = ROOT, env: dict[str, str] | None = None) -> ChildResult:
    """Run one command as a measured child process."""
    return run_children([cmd], cwd=cwd, env=env)[1][0]


# ----------------------------------------------------------------------------------------------------
# Repeated, interleaved measurements
#
# A ratio against a peer is only meaningful when both sides ran under the same load: measured one after the
# other on a shared machine, one side can get a quiet minute and the other a busy one (a README figure once
# moved from 26x to 10x that way). So the benchmarks run ours, the peer, ours, the peer, ..., pair each of
# our runs with the peer run next to it, and report the median of the repeats with their spread, next to
# the machine's load when the run started.


def machine_load() -> dict[str, Any]:
    """1, 5 and 15-minute load averages and the CPU count: how busy the machine was."""
    one, five, fifteen = os.getloadavg()
    return {"loadavg_1m": round(one, 2), "loadavg_5m": round(five, 2), "loadavg_15m": round(fifteen, 2),
            "cpus": os.cpu_count()}


def print_machine_load(when: str = "start") -> dict[str, Any]:
    """Print the machine's load (see `machine_load`) and return it, for the result's JSON line."""
    load = machine_load()
    print(f"machine load at {when}: {load['loadavg_1m']} / {load['loadavg_5m']} / {load['loadavg_15m']} "
          f"(1/5/15 min) on {load['cpus']} CPUs", flush=True)
    return load


# ----------------------------------------------------------------------------------------------------
# Processes, for the benchmarks that fault or measure Airflow's own processes


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live process, from /proc."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError, ValueError):
            continue
        out[int(d.name)] = (ppid, cmd)
    return out


def descendants(table: dict[int, tuple[int, str]], roots: set[int],
                skip: Callable[[str], bool] = lambda cmd: False) -> set[int]:
    """`roots` and every process below them in `table`, less any whose command line `skip` accepts (and what
    is below it)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: set[int] = set()
    todo = list(roots)
    while todo:
        p = todo.pop()
        if p in out or skip(table.get(p, (0, ""))[1]):
            continue
        out.add(p)
        todo += children.get(p, [])
    return out


def interleaved(repeats: int, measure: Sequence[tuple[str, Callable[[int], T]]]) -> dict[str, list[T]]:
    """Call every (name, measure) in order, `repeats` rounds (a, b, a, b, ...); each gets the round number.

    Returns each name's results in round order, so round r of one side ran next to round r of the other."""
    out: dict[str, list[T]] = {name: [] for name, _ in measure}
    for r in range(repeats):
        for name, fn in measure:
            out[name].append(fn(r))
    return out


def spread(values: Sequence[float], digits: int = 2) -> dict[str, Any]:
    """Median of repeated measurements with their spread: min, max, and (max - min) / median in percent."""
    if not values:
        return {"median": None, "min": None, "max": None, "spread_pct": None, "runs": []}
    med = statistics.median(values)
    return {"median": round(med, digits), "min": round(min(values), digits), "max": round(max(values), digits),
            "spread_pct": round(100 * (max(values) - min(values)) / med, 1) if med else None,
            "runs": [round(v, digits) for v in values]}


def paired_ratios(ours: Sequence[float], peer: Sequence[float]) -> list[float]:
    """Per round, ours / peer (rates measured side by side); rounds where the peer measured 0 are left out."""
    return [a / b for a, b in zip(ours, peer, strict=True) if b]


def describe(name: str, s: dict[str, Any], unit: str = "") -> str:
    """One line: 'name: median unit (min-max, spread %, n runs)'."""
    return (f"{name}: {s['median']}{unit} (range {s['min']}-{s['max']}, spread {s['spread_pct']}%, "
            f"{len(s['runs'])} runs)")


# ----------------------------------------------------------------------------------------------------
# Output


def last_json_line(text: str) -> dict[str, Any]:
    """The last non-blank line of `text`, parsed as a JSON object."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError("no output")
    value = json.loads(lines[-1])
    if not isinstance(value, dict):
        raise ValueError(f"last line is not a JSON object: {lines[-1][:200]}")
    return value


def print_json_line(result: dict[str, Any]) -> None:
    """Print the result as one JSON line: the machine-readable last line of every benchmark."""
    print(json.dumps(result, sort_keys=True, ensure_ascii=False), flush=True)


def mib(n_bytes: float) -> float:
    """Bytes in MiB, rounded to 0.1."""
    return round(n_bytes / 2**20, 1)


def rate(count: float, seconds: float, workers: int = 1) -> float:
    """Items per second per worker, 0 when nothing was timed."""
    return round(count / seconds / max(1, workers), 1) if seconds > 0 else 0.0


# ----------------------------------------------------------------------------------------------------
# Synthetic text

_EN_WORDS = """
the of and to in is that for it as with was on be by this are from or have an they which one you were
her all she there would their we him been has when who will more no if out so said what up its about
into than them can only other new some could time these two may then do first any my now such like our
over man me even most made after also did many before must through back years where much your way well
down should because each just those people how too little state good very make world still own see men
work long get here between both life being under never day same another know while last might us great
old year off come since against go came right used take three himself few house use during without
again place around however home small found thought went say part once general high upon school every
don does got united left number course war until always away something fact though water less public put
think almost hand enough far took head yet government system better set told nothing night end why
called didn eyes find going look asked later knew point next program city business give group toward
young days let room president side social given present several order national possible rather second
face per among form important often things looking early white case john become large big need four
within felt along children saw best church ever least power development light seemed family interest
want members others mind country area done turned although open god service certain kind problem began
different door thus help sense means whole matter perhaps itself york times human law line above name
example action company hands local show whether five history gave today either act feet across taken past
quite anyone having seen death experience body word half really week free car field reason everything
data model function variable algorithm network database server query request response python java code
compile runtime memory thread process kernel vector matrix tensor gradient training inference dataset
token sequence attention layer embedding optimizer learning rate batch epoch loss accuracy precision
recall benchmark latency throughput cache storage bucket shard partition index schema column record
equation integral derivative theorem proof lemma polynomial probability distribution variance mean median
chemistry biology physics energy molecule protein cell species climate ocean mountain river forest
recipe flour butter sugar oven minutes garden soil seeds weather travel museum history ancient empire
essay paragraph summary argument evidence conclusion introduction outline draft revise grammar sentence
"""

_FR_TEXT = """
le la les un une des et est dans pour que qui sur avec pas plus par mais comme tout nous vous ils elle
être avoir faire dire pouvoir aller voir savoir vouloir venir devoir prendre trouver donner falloir
parler mettre passer regarder aimer croire demander rester répondre entendre penser arriver connaître
devenir sentir sembler tenir comprendre rendre attendre sortir vivre entrer porter chercher revenir
temps année jour monde vie homme femme enfant maison ville pays travail question réponse exemple problème
solution idée façon moment partie histoire famille école eau terre ciel mer soleil livre langue français
données modèle réseau fonction algorithme calcul méthode résultat analyse théorie expérience science
très bien aussi encore toujours jamais souvent déjà ensuite alors donc ainsi pourquoi comment quand
grand petit nouveau bon premier dernier long haut vrai seul même autre certain important possible
"""

_ZH_TEXT = """
我们 你们 他们 这个 那个 什么 为什么 怎么 如何 可以 需要 应该 已经 因为 所以 但是 如果 虽然 然后 或者
问题 答案 方法 过程 结果 原因 影响 发展 社会 经济 文化 历史 科学 技术 数据 模型 算法 网络 计算 学习
训练 语言 文字 文章 句子 段落 总结 分析 解释 说明 介绍 描述 比较 讨论 建议 计划 目标 任务 系统 程序
代码 函数 变量 数组 列表 字符串 数据库 服务器 请求 响应 内存 线程 进程 性能 效率 速度 质量 安全 环境
自然 植物 动物 地球 太阳 月亮 海洋 山脉 河流 森林 天气 气候 能量 物质 分子 细胞 生命 健康 医学 教育
学生 老师 学校 大学 考试 成绩 知识 能力 经验 工作 公司 市场 产品 用户 客户 服务 管理 政策 法律 政府
重要 主要 基本 简单 复杂 具体 一般 特别 非常 比较 更加 最 很 也 都 还 就 又 再 只 才 的 了 在 是 有 和
"""

_EN_LIST = _EN_WORDS.split()
_FR_WORDS = _FR_TEXT.split()
_ZH_WORDS = _ZH_TEXT.split()
_EN_OPENERS = ["How do I", "Can you explain", "Please write", "What is the best way to", "Why does",
               "Summarize", "Describe", "Give me an example of", "Compare", "Help me understand"]
_FR_OPENERS = ["Comment puis-je", "Peux-tu expliquer", "Écris", "Quelle est la meilleure façon de",
               "Pourquoi", "Résume", "Décris"]
_ZH_OPENERS = ["请解释", "如何", "为什么", "请写一篇关于", "请总结", "比较一下", "请举例说明"]


class TextPool:
    """Deterministic pools of sentences per language; texts are assembled from them by length."""

    def __init__(self, seed: int, sentences_per_lang: int = 3000) -> None:
        rng = random.Random(seed)
        self.sentences: dict[str, list[str]] = {
            "en": [self._sentence(rng, _EN_LIST, " ", ". ") for _ in range(sentences_per_lang)],
            "fr": [self._sentence(rng, _FR_WORDS, " ", ". ") for _ in range(sentences_per_lang)],
            "zh": [self._sentence(rng, _ZH_WORDS, "", "。") for _ in range(sentences_per_lang)],
        }
        self.openers = {"en": _EN_OPENERS, "fr": _FR_OPENERS, "zh": _ZH_OPENERS}

    @staticmethod
    def _sentence(rng: random.Random, words: Sequence[str], sep: str, end: str) -> str:
        n = rng.randint(5, 22)
        picked = rng.choices(words, k=n)
        if rng.random() < 0.15:  # numbers, as in real explanations and code answers
            picked.insert(rng.randrange(n), str(rng.randint(0, 10_000)))
        text = sep.join(picked)
        return text[:1].upper() + text[1:] + end

    def text(self, rng: random.Random, lang: str, n_chars: int, question: bool = False) -> str:
        """About `n_chars` characters of `lang` text (at least one sentence); a question if asked."""
        pool = self.sentences[lang]
        gap = "" if lang == "zh" else " "
        parts: list[str] = [rng.choice(self.openers[lang]) + gap] if question else []
        size = len(parts[0]) if parts else 0
        while size < n_chars or not parts:
            s = pool[rng.randrange(len(pool))]
            parts.append(s)
            size += len(s)
        out = "".join(parts).rstrip()
        if question:
            out = out.rstrip(".。") + ("?" if lang != "zh" else "？")
        return out


# ----------------------------------------------------------------------------------------------------
# Synthetic instruction corpus

FORMATS_CYCLE = ("sharegpt", "openai", "alpaca", "sharegpt")  # per file: ingest detects format per file
MALFORMED_KINDS = ("bad_json", "garbage", "empty_turn", "broken_role_order", "unknown_role", "missing_field")


@dataclass
class CorpusFile:
    """One generated JSONL file: its path, format, records (= non-blank lines) and bad-JSON line numbers."""

    path: str
    format: str
    records: int
    bytes: int
    bad_json_lines: list[int] = field(default_factory=list)


@dataclass
class Corpus:
    """A generated corpus: its files and what was planted in it."""

    directory: str
    files: list[CorpusFile]
    records: int
    bytes: int
    seconds: float
    malformed: dict[str, int]
    languages: dict[str, int]


def _turn_lengths(rng: random.Random, total: int, n_exchanges: int) -> list[tuple[int, int]]:
    """Split `total` characters over exchanges: human turns ~20%, answers ~80%."""
    per = total / n_exchanges
    out = []
    for _ in range(n_exchanges):
        share = rng.uniform(0.12, 0.3)
        out.append((max(20, int(per * share)), max(40, int(per * (1 - share)))))
    return out


def _conversation(rng: random.Random, pool: TextPool, lang: str) -> tuple[str | None, list[tuple[str, str]]]:
    """A system prompt (or None) and (question, answer) exchanges of ~300-2000 characters in all."""
    # Chinese characters carry ~3x the bytes and more meaning per character; keep them shorter.
    lo, hi = (120, 800) if lang == "zh" else (300, 2000)
    total = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    n_exchanges = rng.choices((1, 2, 3, 4), weights=(55, 25, 12, 8))[0]
    system = pool.text(rng, lang, rng.randint(40, 120)) if rng.random() < 0.15 else None
    exchanges = [(pool.text(rng, lang, q, question=True), pool.text(rng, lang, a))
                 for q, a in _turn_lengths(rng, total, n_exchanges)]
    return system, exchanges


def _record(fmt: str, rid: str, system: str | None, exchanges: list[tuple[str, str]]) -> dict[str, Any]:
    if fmt == "sharegpt":
        turns = [{"from": "system", "value": system}] if system else []
        for q, a in exchanges:
            turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        return {"id": rid, "conversations": turns}
    if fmt == "openai":
        msgs = [{"role": "system", "content": system}] if system else []
        for q, a in exchanges:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return {"id": rid, "messages": msgs}
    q, a = exchanges[-1]
    cut = len(q) // 2 if len(q) > 200 else len(q)
    return {"id": rid, "instruction": q[:cut], "input": q[cut:], "output": a}


def _turn_list(rec: dict[str, Any]) -> tuple[list[dict[str, Any]], str, str, str, str]:
    if "conversations" in rec:
        return rec["conversations"], "from", "value", "human", "gpt"
    return rec["messages"], "role", "content", "user", "assistant"


def _malform(rng: random.Random, rec: dict[str, Any], kind: str) -> str:
    """Break `rec` the way real corpora are broken; return the JSONL line (without newline)."""
    if kind in ("bad_json", "garbage"):
        text = json.dumps(rec, ensure_ascii=False)
        if kind == "garbage":
            return rng.choice(["<html><body>502 Bad Gateway</body></html>", "NaN,NaN,NaN",
                               "{'single': 'quotes'}", "\x00\x00\x00\x00", "}{"])
        return text[: rng.randint(1, len(text) - 2)]  # truncated mid-record: never valid JSON
    if "instruction" in rec:  # Alpaca
        if kind == "empty_turn":
            rec["output"] = rng.choice(["", "   ", "\n"])
        elif kind == "missing_field":
            del rec["output"]
            rec["response"] = "misnamed output column"
        else:  # no roles in Alpaca: an empty instruction is its structural defect
            rec["instruction"] = ""
        return json.dumps(rec, ensure_ascii=False)
    turns, role_key, text_key, human, gpt = _turn_list(rec)
    if kind == "empty_turn":
        turns[rng.randrange(len(turns))][text_key] = rng.choice(["", "  ", "\n\n"])
    elif kind == "broken_role_order":
        if rng.random() < 0.5:
            turns.append({role_key: human, text_key: "And one more question left unanswered?"})
        else:
            for t in turns:
                if t[role_key] == human:
                    t[role_key] = gpt
                    break
    elif kind == "unknown_role":
        turns[-1][role_key] = rng.choice(["narrator", "tool_output", "Moderator"])
    else:  # missing_field
        del turns[rng.randrange(len(turns))][text_key]
    return json.dumps(rec, ensure_ascii=False)


def _near_copy(rng: random.Random, exchanges: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """`exchanges` with one word of the first prompt and one word of the last answer replaced."""
    def edit(text: str) -> str:
        words = text.split(" ")
        if len(words) < 8:  # Chinese: no spaces; change one character instead
            k = rng.randrange(len(text))
            return text[:k] + "的" + text[k + 1:]
        words[rng.randrange(len(words))] = rng.choice(["notably", "roughly", "again", "quite", "surely"])
        return " ".join(words)

    out = list(exchanges)
    out[0] = (edit(out[0][0]), out[0][1])
    out[-1] = (out[-1][0], edit(out[-1][1]))
    return out


def write_instruction_corpus(directory: str | Path, n_records: int, *, n_files: int | None = None,
                             seed: int = 1234, malformed_rate: float = 0.01,
                             lang_weights: tuple[float, float, float] = (0.86, 0.08, 0.06),
                             near_dup_rate: float = 0.0) -> Corpus:
    """Stream `n_records` synthetic instruction records into JSONL files under `directory`.

    Files rotate through ShareGPT, OpenAI, Alpaca, ShareGPT (ingest detects format per file); records
    are multi-turn, ~300-2000 characters, mostly English with some Chinese and French; about
    `malformed_rate` of the lines are broken in one of :data:`MALFORMED_KINDS`; about `near_dup_rate`
    are near-duplicates of the record before them (one word of the first prompt and one of the last
    answer replaced: not an exact duplicate by conversation or by prompt, but well above a 0.7 MinHash
    Jaccard). Deterministic for a seed. Only one or two records are in memory at a time.
    """
    t0 = time.perf_counter()
    out_dir = Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_files = n_files or max(4, math.ceil(n_records / 50_000))
    pool = TextPool(seed)
    files: list[CorpusFile] = []
    malformed: Counter[str] = Counter()
    languages: Counter[str] = Counter()
    base, extra = divmod(n_records, n_files)
    for fi in range(n_files):
        count = base + (1 if fi < extra else 0)
        fmt = FORMATS_CYCLE[fi % len(FORMATS_CYCLE)]
        rng = random.Random(f"{seed}:{fi}")
        path = out_dir / f"part-{fi:04d}-{fmt}.jsonl"
        cf = CorpusFile(str(path), fmt, count, 0)
        with path.open("w", encoding="utf-8", newline="\n", buffering=1 << 20) as f:
            previous: tuple[str, str | None, list[tuple[str, str]]] | None = None
            for i in range(count):
                if previous is not None and near_dup_rate and rng.random() < near_dup_rate:
                    lang, system, exchanges = previous[0], previous[1], _near_copy(rng, previous[2])
                else:
                    lang = rng.choices(("en", "zh", "fr"), weights=lang_weights)[0]
                    system, exchanges = _conversation(rng, pool, lang)
                previous = (lang, system, exchanges)
                languages[lang] += 1
                rec = _record(fmt, f"{fmt}-{fi}-{i}", system, exchanges)
                # The first lines stay clean so per-file format detection sees a normal head.
                if i >= 5 and rng.random() < malformed_rate:
                    kind = rng.choice(MALFORMED_KINDS)
                    malformed[kind] += 1
                    line = _malform(rng, rec, kind)
                    if kind in ("bad_json", "garbage"):
                        cf.bad_json_lines.append(i + 1)
                else:
                    line = json.dumps(rec, ensure_ascii=False)
                f.write(line)
                f.write("\n")
        cf.bytes = path.stat().st_size
        files.append(cf)
    return Corpus(str(out_dir), files, n_records, sum(f.bytes for f in files),
                  round(time.perf_counter() - t0, 3), dict(sorted(malformed.items())),
                  dict(sorted(languages.items())))
