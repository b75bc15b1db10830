"""The Airflow UI as a user sees it: `make airflow`'s script starts a real api-server, scheduler, DAG processor and
triggerer on loopback; headless Chromium (Debian's, driven by Selenium through Debian's chromium-driver; nothing is
downloaded) logs in, opens the DAG list and a trigger form, triggers `ingest_source` from its form, opens the run's
Report tab and checks it shows the run's own charts and funnel numbers. Ctrl-C then stops every process.

Screenshots go to `$IIP_TEST_ARTIFACTS` (default: the test's tmp folder)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, free_port, require_or_skip

pytestmark = pytest.mark.integration
# The admin, a second reviewer who may edit DAG runs, and a reader who may only read them (the drift review test).
USERS = "admin:admin,reviewer2:user,reader:viewer"
CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or \
    "/usr/bin/chromedriver"


def _require_browser() -> None:
    missing = [p for p in (CHROMIUM, DRIVER) if not os.path.exists(p)]
    if missing:
        require_or_skip("browser", f"no {missing}: install Debian's chromium and chromium-driver "
                                   "(bash scripts/get-chromium.sh)")


def _free_block() -> int:
    """A port whose next three are free too (the script puts its log and health servers there)."""
    for _ in range(50):
        p = free_port()
        if p < 65000 and all(_port_free(p + i) for i in range(1, 4)):
            return p
    raise RuntimeError("no block of 4 free ports")


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


class UI:
    """A running `scripts/airflow.sh` and what it printed."""

    def __init__(self, proc: subprocess.Popen[str], base: str, password: str, data: Path, lines: list[str],
                 home: Path | None = None):
        self.proc, self.base, self.password, self.data, self.lines = proc, base, password, data, lines
        self.home = home

    def password_of(self, user: str) -> str:
        """The generated password of another user of the simple auth manager (USERS below)."""
        assert self.home is not None
        return str(json.loads((self.home / "simple_auth_manager_passwords.json.generated").read_text())[user])

    def token_of(self, user: str, password: str) -> str:
        req = urllib.request.Request(f"{self.base}/auth/token", method="POST",
                                     data=json.dumps({"username": user, "password": password}).encode(),
                                     headers={"Content-Type": "application/json"})
        return str(self._read(req)["access_token"])

    def call(self, method: str, path: str, body: Any) -> Any:
        """An admin's API request with a JSON body."""
        return self._read(urllib.request.Request(f"{self.base}/api/v2{path}", method=method,
                                                 data=json.dumps(body).encode(),
                                                 headers={"Authorization": f"Bearer {self.token()}",
                                                          "Content-Type": "application/json"}))

    _token = ""

    def token(self) -> str:
        """An API token, fetched once (it outlives the test)."""
        if not self._token:
            req = urllib.request.Request(f"{self.base}/auth/token", method="POST",
                                         data=json.dumps({"username": "admin", "password": self.password}).encode(),
                                         headers={"Content-Type": "application/json"})
            self._token = str(self._read(req)["access_token"])
        return self._token

    def api(self, path: str) -> Any:
        return self._read(urllib.request.Request(f"{self.base}/api/v2{path}",
                                                 headers={"Authorization": f"Bearer {self.token()}"}))

    @staticmethod
    def _read(req: urllib.request.Request) -> Any:
        # The server shares two cores with a busy second test worker and its own scheduler: a reply can take
        # tens of seconds. Three tries of 60 s each before the test gives up on it.
        for attempt in range(3):
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return json.load(r)
            except TimeoutError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UI]:
    _require_browser()
    home, data = tmp_path_factory.mktemp("airflow-ui"), tmp_path_factory.mktemp("ui-data")
    port = _free_block()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
    env.update({"AIRFLOW_HOME": str(home), "IIP_DATA_ROOT": str(data), "AIRFLOW_PORT": str(port),
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": USERS})
    # As from a terminal: SIGINT at its default. A test run started in the background (`cmd &` in a script, as a
    # CI runner may) inherits SIGINT ignored, and bash cannot trap a signal ignored on entry, so Ctrl-C would
    # never reach the script's trap (the cause of this test's failures under a backgrounded `.ci/run`).
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "airflow.sh")], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []
    password = ""
    assert proc.stdout is not None
    deadline = time.time() + 420
    for line in proc.stdout:
        lines.append(line.rstrip())
        if m := re.match(r"login\s+: admin / (\S+)", line):
            password = m.group(1)
        if line.startswith("Ctrl-C stops it.") or time.time() > deadline:
            break
    assert password and any(f"http://127.0.0.1:{port}/" in x for x in lines), "\n".join(lines[-30:])
    u = UI(proc, f"http://127.0.0.1:{port}", password, data, lines, home)
    try:
        yield u
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
            try:
                out, _ = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
            lines.extend(out.splitlines())


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = Path(os.environ.get("IIP_TEST_ARTIFACTS") or tmp_path_factory.mktemp("ui-screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1500,1000", "--disable-dev-shm-usage",
              "--hide-scrollbars"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def type_into(d: Any, field: Any, text: str) -> None:
    """Replace a form field's text with `text`, typed a key at a time as a user does, and wait until the field
    holds exactly that.

    The form re-renders on every key: a whole string sent at once lost the same key at each try (`raw/i.jsonl`
    for `raw/ui.jsonl` under a long xdist temp path), so each key waits for the one before to land."""
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    for _ in range(3):
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(Keys.DELETE)
        for i, ch in enumerate(text, 1):
            field.send_keys(ch)
            try:
                WebDriverWait(d, 2).until(lambda _, n=i: len(field.get_attribute("value") or "") >= n)
            except Exception:  # a dropped key: start over
                break
        if field.get_attribute("value") == text:
            return
    raise AssertionError(f"the form field never held {text!r}; it holds {field.get_attribute('value')!r}")


def submit_button(d: Any) -> Any:
    """The trigger dialog's own Trigger button (the page behind it has one too)."""
    from selenium.webdriver.common.by import By

    buttons = d.find_elements(By.XPATH, "//*[@role='dialog']//button[contains(normalize-space(.), 'Trigger')]")
    assert buttons, "no Trigger button in the dialog"
    return buttons[-1]


def test_anonymous_plugin_requests_are_refused_by_the_real_server(ui: UI) -> None:
    for path in ("/iip/reports", "/iip/runs/ingest_source/x", "/iip/reports/view?path=."):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(ui.base + path, timeout=30)
        assert err.value.code in (401, 403), path


def test_a_user_triggers_a_run_and_reads_its_report(ui: UI, artifacts: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    raw = ui.data / "raw" / "ui.jsonl"
    raw.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"conversations": [{"from": "human", "value": f"Explain the number {i} with an example, please."},
                               {"from": "gpt", "value": f"The number {i} has many arithmetic properties; e.g. {i}+1."}]}
            for i in range(30)]
    raw.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken json\n")

    d = _browser()
    wait = WebDriverWait(d, 90)
    try:
        d.get(ui.base + "/")  # the login page of Airflow's simple auth manager
        wait.until(ec.presence_of_element_located((By.NAME, "username"))).send_keys("admin")
        d.find_element(By.NAME, "password").send_keys(ui.password)
        d.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait.until(lambda drv: "/auth/login" not in drv.current_url)

        d.get(ui.base + "/dags")
        for dag in ("foundational_selection", "ingest_source", "conversational_synthesis"):
            wait.until(ec.presence_of_element_located((By.XPATH, f"//*[contains(text(), '{dag}')]")))
        d.save_screenshot(str(artifacts / "dags.png"))

        d.get(ui.base + "/dags/foundational_selection")  # its trigger form renders every Param as a field
        wait.until(ec.element_to_be_clickable((By.XPATH, "//button[contains(., 'Trigger')]"))).click()
        dialog = wait.until(ec.presence_of_element_located((By.XPATH, "//*[@role='dialog']")))
        wait.until(ec.presence_of_element_located((By.ID, "element_sources")))
        fields = {e.get_attribute("id") for e in d.find_elements(By.XPATH, "//*[starts-with(@id, 'element_')]")}
        expected = {"sources", "run_name", "languages", "budgets", "benchmarks", "dedup_scopes", "dsir_targets"}
        assert {f"element_{f}" for f in expected} <= fields, sorted(fields)
        assert "[object Object]" not in dialog.text  # object-valued Params are JSON editors, not broken text
        d.save_screenshot(str(artifacts / "trigger_form.png"))
        assert submit_button(d).is_enabled()

        d.get(ui.base + "/dags/ingest_source")  # trigger a small DAG from its form, as a user does
        wait.until(ec.element_to_be_clickable((By.XPATH, "//button[contains(., 'Trigger')]"))).click()
        wait.until(ec.presence_of_element_located((By.XPATH, "//*[@role='dialog']")))
        src = wait.until(ec.presence_of_element_located((By.ID, "element_source_uri")))
        type_into(d, src, str(raw))
        type_into(d, d.find_element(By.ID, "element_source_name"), "ui_corpus")
        submit_button(d).click()

        run: dict[str, Any] = {}
        deadline = time.time() + 420
        while time.time() < deadline:
            runs = ui.api("/dags/ingest_source/dagRuns?order_by=-run_after&limit=1")["dag_runs"]
            run = runs[0] if runs else {}
            if run.get("state") in ("success", "failed"):
                break
            time.sleep(3)
        assert run.get("state") == "success", run
        assert run["conf"]["source_uri"] == str(raw) and run["conf"]["source_name"] == "ui_corpus"
        stats = json.loads((ui.data / "sources" / "ui_corpus" / "ingest" / "stats.json").read_text())
        assert (stats["records_in"], stats["records_kept"]) == (31, 30)

        run_id = run["dag_run_id"]
        d.get(f"{ui.base}/dags/ingest_source/runs/{urllib.parse.quote(run_id, safe='')}")
        wait.until(ec.element_to_be_clickable((By.XPATH, "//a[normalize-space()='Report']"))).click()
        frame = wait.until(ec.presence_of_element_located((By.TAG_NAME, "iframe")))
        time.sleep(1)
        d.save_screenshot(str(artifacts / "report_tab.png"))
        d.switch_to.frame(frame)
        wait.until(ec.presence_of_element_located((By.ID, "funnel")))
        body = d.find_element(By.TAG_NAME, "body").text
        assert len(d.find_elements(By.TAG_NAME, "svg")) >= 3
        assert f"{stats['records_kept']:,} / {stats['records_in']:,}" in body  # this run's own funnel
        assert "bad_json" in body and "{broken json" in body and run_id in body
        d.find_element(By.TAG_NAME, "figure").screenshot(str(artifacts / "funnel.png"))
        d.switch_to.default_content()

        d.get(f"{ui.base}/iip/runs/ingest_source/{urllib.parse.quote(run_id, safe='')}/tasks/ingest.run")
        assert "ingest: ingest" in d.find_element(By.TAG_NAME, "body").text  # the task view: that step's section
        d.get(ui.base + "/iip/reports")
        listing = d.find_element(By.TAG_NAME, "body").text
        assert run_id in listing and "success" in listing and "sources/ui_corpus" in listing
        d.save_screenshot(str(artifacts / "dataset_reports.png"))
    finally:
        d.quit()


def login(d: Any, base: str, user: str, password: str) -> None:
    """Log in to Airflow's simple auth manager as `user` (after logging out whoever was in)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(d, 90)
    d.get(base + "/")
    d.delete_all_cookies()
    d.get(base + "/")
    wait.until(ec.presence_of_element_located((By.NAME, "username"))).send_keys(user)
    d.find_element(By.NAME, "password").send_keys(password)
    d.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait.until(lambda drv: "/auth/login" not in drv.current_url)


def mark(d: Any, n: int, value: str, comment: str = "") -> None:
    """Mark the n-th item still to mark on the review page (in its frame) and wait until it is saved."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    card = d.find_elements(By.CSS_SELECTOR, "#todo .item")[n]
    if comment:
        card.find_element(By.CLASS_NAME, "comment").send_keys(comment)
    card.find_element(By.CSS_SELECTOR, f"button.m[data-mark='{value}']").click()
    WebDriverWait(d, 60).until(lambda _: card.find_element(By.CLASS_NAME, "status").text in ("saved",)
                               or card.find_element(By.CLASS_NAME, "status").text.startswith("not saved"))
    assert card.find_element(By.CLASS_NAME, "status").text == "saved"


def test_reviewers_mark_drift_in_the_review_tab_and_the_report_shows_it(ui: UI, artifacts: Path) -> None:
    """A `conversational_synthesis` run (queued, its DAG paused: the run folder is written by the project's runner
    instead of the 135M model) gets a Review tab. The admin marks three items, reloads and finds them; a second
    reviewer marks two; a reader may read but not mark; the report task's code then puts the figures and the gate in
    the run's report."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from operators.orchestration.settings import safe_name
    from operators.report import write_report
    from operators.review.marks import all_marks
    from tests.review_fixture import synthesis_run

    ui.call("PATCH", "/dags/conversational_synthesis", {"is_paused": True})
    run = ui.call("POST", "/dags/conversational_synthesis/dagRuns",
                  {"logical_date": None, "conf": {"review_sample": {"size": 8, "seed": 0}, "drift_gate": 0.05}})
    run_id = run["dag_run_id"]
    folder = synthesis_run(ui.data / "runs" / safe_name(run_id), seeds=10, rounds=2)
    quoted = urllib.parse.quote(run_id, safe="")
    page = f"{ui.base}/iip-review/runs/conversational_synthesis/{quoted}"

    d = _browser()
    wait = WebDriverWait(d, 90)
    try:
        login(d, ui.base, "admin", ui.password)
        d.get(f"{ui.base}/dags/conversational_synthesis/runs/{quoted}")
        wait.until(ec.element_to_be_clickable((By.XPATH, "//a[normalize-space()='Review']"))).click()
        frame = wait.until(ec.presence_of_element_located((By.TAG_NAME, "iframe")))
        d.switch_to.frame(frame)
        wait.until(ec.text_to_be_present_in_element((By.ID, "progress"), "0 / 8 marked"))
        assert len(d.find_elements(By.CSS_SELECTOR, "#todo .item")) == 8
        first = [c.get_attribute("data-id") for c in d.find_elements(By.CSS_SELECTOR, "#todo .item")[:3]]
        mark(d, 0, "faithful")
        mark(d, 1, "drifted", comment="asks about another topic")
        mark(d, 2, "unsafe")
        assert d.find_element(By.ID, "progress").text == "3 / 8 marked"
        assert "Needs a stronger validator" in d.find_element(By.ID, "figures").text  # live, without a reload
        d.switch_to.default_content()
        d.save_screenshot(str(artifacts / "review_tab.png"))

        d.refresh()  # a reviewer who comes back: the marks are there, the next unmarked item first
        frame = wait.until(ec.presence_of_element_located((By.TAG_NAME, "iframe")))
        d.switch_to.frame(frame)
        wait.until(ec.text_to_be_present_in_element((By.ID, "progress"), "3 / 8 marked"))
        done = {c.get_attribute("data-id"): c for c in d.find_elements(By.CSS_SELECTOR, "#done .item")}
        assert list(done) == first
        assert [done[i].get_attribute("data-mark") for i in first] == ["faithful", "drifted", "unsafe"]
        pressed = done[first[1]].find_element(By.CSS_SELECTOR, "button[aria-pressed='true']")
        assert pressed.get_attribute("data-mark") == "drifted"
        assert done[first[1]].find_element(By.CLASS_NAME, "comment").get_attribute("value") == \
            "asks about another topic"
        assert len(d.find_elements(By.CSS_SELECTOR, "#todo .item")) == 5
        d.switch_to.default_content()

        login(d, ui.base, "reviewer2", ui.password_of("reviewer2"))  # a second reviewer: their own file
        d.get(page)
        wait.until(ec.text_to_be_present_in_element((By.ID, "progress"), "0 / 8 marked"))
        mark(d, 0, "faithful")
        mark(d, 1, "faithful")  # a marked card stays in place until the page is reloaded
        d.refresh()
        wait.until(ec.text_to_be_present_in_element((By.ID, "progress"), "2 / 8 marked"))
        figures = d.find_element(By.ID, "figures").text
        assert "Agreement between reviewers: 50.0%" in figures and "reviewer2 (2)" in figures
        d.execute_script("window.scrollTo(0, 0)")  # a reload keeps the scroll position
        d.save_screenshot(str(artifacts / "review.png"))
    finally:
        d.quit()

    marks = all_marks(str(folder))
    assert {r: sorted(m) for r, m in marks.items()} == {"admin": sorted(first), "reviewer2": sorted(first[:2])}
    assert marks["admin"][first[1]] == {**marks["admin"][first[1]], "mark": "drifted",
                                        "comment": "asks about another topic"}

    reader = ui.token_of("reader", ui.password_of("reader"))  # a reader sees the results and may not mark
    req = urllib.request.Request(page, headers={"Authorization": f"Bearer {reader}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        text = r.read().decode()
    assert "Read only" in text and "reviewer2 (2)" in text
    post = urllib.request.Request(page + "/marks", method="POST", headers={
        "Authorization": f"Bearer {reader}", "Content-Type": "application/json"},
        data=json.dumps({"item": first[2], "mark": "faithful"}).encode())
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(post, timeout=60)
    assert err.value.code == 403

    # The report task's code (what clearing the run's `report` task runs): the figures and the gate in the report.
    write_report(str(folder), run={"dag_id": "conversational_synthesis", "run_id": run_id}, index_root=str(ui.data))
    d = _browser()
    wait = WebDriverWait(d, 90)
    try:
        login(d, ui.base, "admin", ui.password)
        d.get(f"{ui.base}/iip/runs/conversational_synthesis/{quoted}")
        wait.until(ec.presence_of_element_located((By.ID, "drift-review")))
        body = d.find_element(By.TAG_NAME, "body").text
        # item 1: both faithful; item 2: drifted vs faithful (a tie counts as an error); item 3: unsafe -> 2 of 3
        assert "Needs a stronger validator" in body and "overall error rate 66.7%" in body
        assert "95% CI" in body and "Agreement between reviewers: 50.0%" in body
        d.execute_script("document.getElementById('drift-review').scrollIntoView()")
        d.save_screenshot(str(artifacts / "review_report.png"))
    finally:
        d.quit()


def test_ctrl_c_stops_every_process(ui: UI) -> None:
    ui.proc.send_signal(signal.SIGINT)
    out, _ = ui.proc.communicate(timeout=60)
    ui.lines.extend(out.splitlines())
    m = next((re.search(r"process group (\d+)", x) for x in ui.lines if "process group" in x), None)
    assert m is not None, "\n".join(ui.lines[-20:])
    # The script has SIGKILLed what ignored SIGTERM; a killed process lingers as a zombie until it is reaped,
    # which takes a moment on a loaded machine. Live processes are what must not be left.
    deadline = time.time() + 15
    while True:
        left = [p for p in subprocess.run(["pgrep", "-g", m.group(1)], capture_output=True, text=True).stdout.split()
                if _state(p) not in ("Z", "")]
        if not left or time.time() > deadline:
            break
        time.sleep(0.5)
    assert left == [], f"processes left in group {m.group(1)}: {[(p, _state(p), _cmdline(p)) for p in left]}"


def _state(pid: str) -> str:
    """A process's state letter from /proc (Z: a zombie), or "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return ""
