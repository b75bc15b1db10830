"""Trigger a DAG from its Airflow trigger form in headless Chromium, as a user does, and screenshot a section of a
run's Report tab: how docs/ui/replay_sweep.png and docs/ui/selection_ablation.png were made (docs/experiments.md).

Needs a running `make airflow` (or scripts/airflow.sh) and Debian's chromium + chromium-driver (Selenium).

  python scripts/ui_experiments.py trigger foundational_selection \\
      '{"sources": ["sharegpt_demo"], "run_name": "demo-ablation", "selection_ablation": true}'
  python scripts/ui_experiments.py wait foundational_selection <run_id>
  python scripts/ui_experiments.py shot foundational_selection <run_id> selection-ablation out.png --above 190

`--base` (default http://127.0.0.1:8080) names another UI. The exact Params of the README's screenshots are in
docs/experiments.md.

Every Param given is typed into its form field (text and number inputs key by key, lists of strings as lines,
switches clicked, objects and lists of numbers pasted into the field's JSON editor); the run's conf is then read back
from the REST API and compared with what was asked, so a field the form mangled fails loudly.
The password is read from $AIRFLOW_HOME/simple_auth_manager_passwords.json.generated (default .airflow/demo).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


class Api:
    def __init__(self, base: str, user: str, password: str):
        self.base, self.user, self.password, self._token = base, user, password, ""

    def token(self) -> str:
        if not self._token:
            req = urllib.request.Request(f"{self.base}/auth/token", method="POST",
                                         data=json.dumps({"username": self.user, "password": self.password}).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                self._token = json.load(r)["access_token"]
        return self._token

    def get(self, path: str) -> Any:
        req = urllib.request.Request(f"{self.base}/api/v2{path}", headers={"Authorization": f"Bearer {self.token()}"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.load(r)


def browser(height: int = 1000) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size=1500,{height}",
              "--disable-dev-shm-usage", "--hide-scrollbars"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def login(d: Any, base: str, user: str, password: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(d, 120)
    d.get(base + "/")
    wait.until(ec.presence_of_element_located((By.NAME, "username"))).send_keys(user)
    d.find_element(By.NAME, "password").send_keys(password)
    d.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait.until(lambda drv: "/auth/login" not in drv.current_url)


def type_keys(d: Any, field: Any, text: str) -> None:
    """Replace an input's text, a key at a time (the form re-renders on every key), until it holds `text`."""
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    def typed(n: int) -> Any:
        return lambda _: len(field.get_attribute("value") or "") >= n

    for _ in range(3):
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(Keys.DELETE)
        for i, ch in enumerate(text, 1):
            field.send_keys(Keys.ENTER if ch == "\n" else ch)
            try:
                WebDriverWait(d, 3).until(typed(i))
            except Exception:
                break
        if (field.get_attribute("value") or "") == text:
            return
    raise AssertionError(f"the field never held {text!r}; it holds {field.get_attribute('value')!r}")


def editor_text(d: Any, field: Any) -> str:
    """The text of a Monaco or CodeMirror JSON editor."""
    return str(d.execute_script(
        "const el = arguments[0];"
        "const cm = el.querySelector('.cm-content'); if (cm) return cm.innerText;"
        "const ta = el.querySelector('textarea'); const lines = el.querySelectorAll('.view-line');"
        "if (lines.length) return Array.from(lines).map(l => l.innerText).join('\\n');"
        "return ta ? ta.value : el.innerText;", field)).replace("\u00a0", " ")


def type_json(d: Any, field: Any, value: Any) -> None:
    """Replace a JSON editor's text with `value` (compact JSON, pasted), checked by parsing the editor's text."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    text = json.dumps(value, separators=(",", ":"))
    # Typed key by key, the editor's bracket closing, and the form resetting an emptied editor to `{}`, garble the
    # text; a user pastes it: select all, paste (one edit).
    origin = d.execute_script("return location.origin")
    d.execute_cdp_cmd("Browser.grantPermissions", {"origin": origin,
                                                   "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    for _ in range(3):
        d.execute_script("arguments[0].scrollIntoView({block: 'center'})", field)
        lines = field.find_elements("css selector", ".view-lines, .cm-content")
        (lines[0] if lines else field).click()
        time.sleep(0.3)
        d.execute_async_script("navigator.clipboard.writeText(arguments[0])"
                               ".then(arguments[1], e => arguments[1](String(e)))", text)
        ActionChains(d).key_down(Keys.CONTROL).send_keys("a").key_up(Keys.CONTROL).perform()
        ActionChains(d).key_down(Keys.CONTROL).send_keys("v").key_up(Keys.CONTROL).perform()
        time.sleep(1)
        try:
            if json.loads(editor_text(d, field)) == value:
                return
        except ValueError:
            pass
    raise AssertionError(f"the JSON editor never held {text}; it holds {editor_text(d, field)!r}")


def set_switch(d: Any, field: Any, on: bool) -> None:
    def state() -> bool:
        boxes = field.find_elements("css selector", "input[type=checkbox]")
        if boxes:
            return bool(boxes[0].is_selected())
        return field.get_attribute("data-state") == "checked"

    if state() != on:
        d.execute_script("arguments[0].scrollIntoView({block: 'center'})", field)
        control = field.find_elements("css selector", "[data-part=control]") or [field]
        control[0].click()
        time.sleep(0.3)
    assert state() == on, f"the switch did not turn {'on' if on else 'off'}"


def fill_form(d: Any, schema: dict[str, Any], values: dict[str, Any]) -> None:
    """Type each value into its Param's form field, chosen by the Param's JSON schema."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(d, 60)
    for name, value in values.items():
        # Chakra's ids: the field itself, or its switch / number-input root
        ids = (f"element_{name}", f"switch:element_{name}", f"number-input:element_{name}")
        wait.until(lambda drv: any(drv.find_elements(By.ID, i) for i in ids))  # noqa: B023 (used at once)
        field = next(e for i in ids for e in d.find_elements(By.ID, i))
        if field.get_attribute("id").startswith("number-input:"):
            field = field.find_element(By.TAG_NAME, "input")
        d.execute_script("arguments[0].scrollIntoView({block: 'center'})", field)
        s = schema[name]
        types = s.get("type") if isinstance(s.get("type"), list) else [s.get("type")]
        if "boolean" in types:
            set_switch(d, field, bool(value))
        elif "array" in types and (s.get("items") or {}).get("type", "string") == "string" and \
                all(isinstance(v, str) for v in value):
            type_keys(d, field, "\n".join(value))
        elif "array" in types or "object" in types:
            type_json(d, field, value)
        else:
            type_keys(d, field, "" if value is None else str(value))
        print(f"  {name} = {json.dumps(value)}", flush=True)


def trigger(api: Api, dag: str, values: dict[str, Any], shots: Path | None = None, submit: bool = True) -> str:
    """Open the DAG's trigger form, fill the fields, press Trigger; returns the new run's id."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    params = api.get(f"/dags/{dag}/details")["params"]
    schema = {k: v.get("schema", {}) for k, v in params.items()}
    before = {r["dag_run_id"] for r in api.get(f"/dags/{dag}/dagRuns?limit=100")["dag_runs"]}
    d = browser()
    wait = WebDriverWait(d, 120)
    try:
        login(d, api.base, api.user, api.password)
        d.get(f"{api.base}/dags/{dag}")
        wait.until(ec.element_to_be_clickable((By.XPATH, "//button[contains(., 'Trigger')]"))).click()
        wait.until(ec.presence_of_element_located((By.XPATH, "//*[@role='dialog']")))
        wait.until(ec.presence_of_element_located((By.ID, "element_run_name")))
        fill_form(d, schema, values)
        if shots:
            d.save_screenshot(str(shots / f"trigger_{dag}.png"))
        buttons = d.find_elements(By.XPATH, "//*[@role='dialog']//button[contains(normalize-space(.), 'Trigger')]")
        assert buttons and buttons[-1].is_enabled(), "the Trigger button is disabled: the form is not valid"
        if not submit:
            return ""
        buttons[-1].click()
        deadline = time.time() + 120
        while time.time() < deadline:
            new = [r for r in api.get(f"/dags/{dag}/dagRuns?limit=100&order_by=-run_after")["dag_runs"]
                   if r["dag_run_id"] not in before]
            if new:
                run = new[0]
                break
            time.sleep(2)
        else:
            raise AssertionError("no new run appeared after pressing Trigger")
    finally:
        d.quit()
    wrong = {k: (v, run["conf"].get(k)) for k, v in values.items() if run["conf"].get(k) != v}
    assert not wrong, f"the run's conf differs from what was typed: {wrong}"
    print(f"triggered {dag} run {run['dag_run_id']}", flush=True)
    return str(run["dag_run_id"])


def wait_run(api: Api, dag: str, run_id: str, timeout: float) -> dict[str, Any]:
    quoted = urllib.parse.quote(run_id, safe="")
    deadline, last = time.time() + timeout, ""
    while time.time() < deadline:
        run = api.get(f"/dags/{dag}/dagRuns/{quoted}")
        if run["state"] != last:
            print(f"{time.strftime('%H:%M:%S')} {dag} {run_id}: {run['state']}", flush=True)
            last = run["state"]
        if run["state"] in ("success", "failed"):
            return dict(run)
        time.sleep(15)
    raise TimeoutError(f"{dag} {run_id} still {last} after {timeout:.0f} s")


def shot(api: Api, dag: str, run_id: str, anchor: str, out: Path, above: int = 0, height: int = 1000) -> None:
    """Open the run's Report tab, scroll its frame to the section `anchor` (and `above` pixels further up, to show
    what precedes it) and save the window, `height` pixels tall, as a PNG."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser(height)
    wait = WebDriverWait(d, 120)
    try:
        login(d, api.base, api.user, api.password)
        d.get(f"{api.base}/dags/{dag}/runs/{urllib.parse.quote(run_id, safe='')}")
        wait.until(ec.element_to_be_clickable((By.XPATH, "//a[normalize-space()='Report']"))).click()
        frame = wait.until(ec.presence_of_element_located((By.TAG_NAME, "iframe")))
        d.switch_to.frame(frame)
        section = wait.until(ec.presence_of_element_located((By.ID, anchor)))
        d.execute_script("arguments[0].scrollIntoView({block: 'start'}); window.scrollBy(0, -arguments[1])",
                         section, above)
        time.sleep(1)
        d.switch_to.default_content()
        d.save_screenshot(str(out))
        print(f"wrote {out} ({out.stat().st_size // 1024} KiB)", flush=True)
    finally:
        d.quit()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="http://127.0.0.1:8080")
    ap.add_argument("--user", default="admin")
    ap.add_argument("--airflow-home", default=os.environ.get("AIRFLOW_HOME") or str(ROOT / ".airflow" / "demo"))
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("trigger")
    t.add_argument("dag")
    t.add_argument("params", help="JSON object: Param name -> value, typed into the form in this order")
    t.add_argument("--shots", type=Path, help="folder for a screenshot of the filled form")
    t.add_argument("--no-submit", action="store_true", help="fill the form, do not press Trigger")
    w = sub.add_parser("wait")
    w.add_argument("dag")
    w.add_argument("run_id")
    w.add_argument("--timeout", type=float, default=7200)
    s = sub.add_parser("shot")
    s.add_argument("dag")
    s.add_argument("run_id")
    s.add_argument("anchor")
    s.add_argument("out", type=Path)
    s.add_argument("--above", type=int, default=0, help="pixels above the section to show too")
    s.add_argument("--height", type=int, default=1000, help="browser window height")
    a = ap.parse_args()
    pw_file = Path(a.airflow_home) / "simple_auth_manager_passwords.json.generated"
    api = Api(a.base, a.user, str(json.loads(pw_file.read_text())[a.user]))
    if a.cmd == "trigger":
        trigger(api, a.dag, json.loads(a.params), a.shots, submit=not a.no_submit)
    elif a.cmd == "wait":
        run = wait_run(api, a.dag, a.run_id, a.timeout)
        print(json.dumps({k: run.get(k) for k in ("state", "start_date", "end_date")}))
        return 0 if run["state"] == "success" else 1
    else:
        shot(api, a.dag, a.run_id, a.anchor, a.out, above=a.above, height=a.height)
    return 0


if __name__ == "__main__":
    sys.exit(main())
