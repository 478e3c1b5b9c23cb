"""Screenshot of Thunderbird reading the demo's INBOX through the IMAP proxy.

    python3 docs/tools/thunderbird_screenshot.py [--out docs/thunderbird-demo.png]

Needs (Debian): thunderbird xvfb imagemagick xdotool, and Dovecot/dig for the demo
itself. What it does: starts ``python -m smimeproxy.demo`` (stays up) in a temporary
directory, writes a fresh Thunderbird profile whose only account is IMAP ``alice`` at
the demo's proxy (plaintext, loopback), starts Xvfb and Thunderbird on it, types the
demo password into Thunderbird's password prompt like a person would, opens the INBOX,
selects the partner's message and takes a screenshot of the whole screen with
ImageMagick's ``import -window root``. Everything it started is stopped at the end.

Not guaranteed: pixel-identical output between runs or Thunderbird versions (the
window layout is Thunderbird's); it is a documentation tool, not a test.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "alice-demo"
DISPLAY = ":77"

PREFS = """\
user_pref("mail.account.account1.identities", "id1");
user_pref("mail.account.account1.server", "server1");
user_pref("mail.account.account2.server", "server2");
user_pref("mail.accountmanager.accounts", "account1,account2");
user_pref("mail.accountmanager.defaultaccount", "account1");
user_pref("mail.accountmanager.localfoldersserver", "server2");
user_pref("mail.identity.id1.fullName", "Alice");
user_pref("mail.identity.id1.useremail", "alice@acme.test");
user_pref("mail.identity.id1.valid", true);
user_pref("mail.server.server1.hostname", "127.0.0.1");
user_pref("mail.server.server1.port", {port});
user_pref("mail.server.server1.type", "imap");
user_pref("mail.server.server1.userName", "alice");
user_pref("mail.server.server1.name", "alice@acme.test (smimeproxy demo)");
user_pref("mail.server.server1.socketType", 0);
user_pref("mail.server.server1.authMethod", 3);
user_pref("mail.server.server1.login_at_startup", true);
user_pref("mail.server.server1.check_new_mail", true);
user_pref("mail.server.server2.hostname", "Local Folders");
user_pref("mail.server.server2.type", "none");
user_pref("mail.server.server2.userName", "nobody");
user_pref("mail.server.server2.name", "Local Folders");
user_pref("mail.shell.checkDefaultClient", false);
user_pref("mail.provider.enabled", false);
user_pref("mail.startup.enabledMailCheckOnce", true);
user_pref("mail.rights.version", 1);
user_pref("mail.rights.override", true);
user_pref("mailnews.start_page.enabled", false);
user_pref("mailnews.start_page_override.mstone", "ignore");
user_pref("mail.spotlight.firstRunDone", true);
user_pref("mail.winsearch.firstRunDone", true);
user_pref("mail.inappnotifications.enabled", false);
user_pref("app.update.enabled", false);
user_pref("app.update.auto", false);
user_pref("browser.shell.checkDefaultBrowser", false);
user_pref("datareporting.policy.dataSubmissionEnabled", false);
user_pref("datareporting.healthreport.uploadEnabled", false);
user_pref("toolkit.telemetry.reportingpolicy.firstRun", false);
user_pref("toolkit.telemetry.enabled", false);
user_pref("extensions.update.enabled", false);
user_pref("mail.tabs.drawInTitlebar", false);
user_pref("mailnews.default_sort_order", 2);
"""


def _wait_for(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


def _windows(name: str) -> list[str]:
    done = subprocess.run(
        ["xdotool", "search", "--onlyvisible", "--name", name],
        capture_output=True,
        text=True,
        env=dict(os.environ, DISPLAY=DISPLAY),
    )
    return done.stdout.split()


def _xdo(*args: str) -> None:
    subprocess.run(["xdotool", *args], env=dict(os.environ, DISPLAY=DISPLAY), check=False)


def _shot(path: Path) -> None:
    subprocess.run(
        ["import", "-window", "root", str(path)], env=dict(os.environ, DISPLAY=DISPLAY), check=True
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "thunderbird-demo.png")
    parser.add_argument("--keep", action="store_true", help="leave the work directory")
    args = parser.parse_args()
    for tool in ("thunderbird", "Xvfb", "import", "xdotool"):
        if shutil.which(tool) is None:
            print("missing tools: apt-get install -y thunderbird xvfb imagemagick xdotool")
            return 2
    work = Path(tempfile.mkdtemp(prefix="smimeproxy-thunderbird-"))
    started: list[subprocess.Popen[bytes]] = []
    try:
        demo_log = open(work / "demo.out", "w+b")
        demo = subprocess.Popen(
            [sys.executable, "-m", "smimeproxy.demo", "--dir", str(work / "demo")],
            cwd=ROOT,
            stdout=demo_log,
            stderr=subprocess.STDOUT,
        )
        started.append(demo)

        def demo_up() -> str | None:
            text = (work / "demo.out").read_text(errors="replace")
            if "DEMO FAILED" in text or demo.poll() is not None:
                raise SystemExit("the demo failed:\n" + text[-3000:])
            return text if "stays up" in text else None

        text = _wait_for(demo_up, 180, "the demo")
        port = int(re.search(r"IMAP \(incoming\):\s+127\.0\.0\.1 port (\d+)", text).group(1))  # type: ignore[union-attr]
        profile = work / "profile"
        profile.mkdir()
        (profile / "prefs.js").write_text(PREFS.format(port=port))
        xvfb = subprocess.Popen(
            ["Xvfb", DISPLAY, "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(xvfb)
        time.sleep(1)
        env = dict(
            os.environ,
            DISPLAY=DISPLAY,
            MOZ_DISABLE_CONTENT_SANDBOX="1",
            MOZ_DISABLE_GMP_SANDBOX="1",
            MOZ_CRASHREPORTER_DISABLE="1",
            HOME=str(work),
        )
        tb = subprocess.Popen(
            ["thunderbird", "--no-remote", "--profile", str(profile)],
            env=env,
            stdout=open(work / "thunderbird.log", "wb"),
            stderr=subprocess.STDOUT,
        )
        started.append(tb)
        # the password prompt, answered like a person would
        prompt = _wait_for(
            lambda: _windows("Password") or _windows("password"), 90, "password prompt"
        )
        time.sleep(1)
        _xdo("windowfocus", "--sync", prompt[0])
        _xdo("type", "--delay", "50", PASSWORD)
        _xdo("key", "Return")
        time.sleep(6)
        _shot(work / "after-login.png")
        main_window = _wait_for(lambda: _windows("Thunderbird"), 60, "the main window")
        _xdo("windowsize", main_window[0], "1280", "800")
        _xdo("windowmove", main_window[0], "0", "0")
        time.sleep(2)
        # the INBOX is open (the account's first folder); click the partner's message,
        # the first card of the message list at this fixed 1280x800 layout
        _xdo("mousemove", "435", "115", "click", "1")
        time.sleep(6)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        _shot(args.out)
        print(f"wrote {args.out} (work files in {work})")
        return 0
    finally:
        for process in reversed(started):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
