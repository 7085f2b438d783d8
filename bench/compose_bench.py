"""Message composition cost: Postroom's ``build(Draft)`` vs the standard library's
``EmailMessage`` (what Postroom used before, and what most Python code composes with) and
Django's ``EmailMultiAlternatives.message()`` (what a Django app builds before sending).

Composition is on the hot path of the Python API (issue 3: p99 <= 2 ms per send), so it is
measured per call: p50 and p99 over N calls per case, in one process, after a warm-up.
The three build the same message (From, To, Subject, Date, Message-ID, bodies, files);
Postroom also derives the text part of an HTML-only message, the others send HTML alone.

    .venv/bin/python bench/compose_bench.py            # 5,000 calls per case and peer
    .venv/bin/python bench/compose_bench.py --out -    # print only

The report goes between this script's markers in docs/benchmarks.md (below the relay
bench's generated part).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

import _report  # bench/_report.py: the docs/benchmarks.md block

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from postroom.message import Attachment, Draft, build  # noqa: E402

NAME = "compose_bench.py"
BEGIN, END = _report.markers(NAME)
HTML = ("<html><body><h1>Your order 4711</h1><p>Thank you for your order. "
        + "Your teapot is on its way; track it <a href='https://shop.example.com/t/4711'>here"
        "</a>.</p>" * 8 + "<ul>" + "<li>1 × teapot, 39.00 EUR</li>" * 10
        + "</ul><img src='cid:logo' alt='Shop'></body></html>")
PDF = os.urandom(20_000)
LOGO = os.urandom(3_000)
CASES: dict[str, dict[str, Any]] = {
    "small text": dict(sender=("Shop", "shop@example.com"), to=("Bob", "bob@example.org"),
                       subject="Your order", text="Hi Bob,\n\nyour order is on its way.\n"),
    "html only": dict(sender=("Shop", "shop@example.com"), to=("Bob", "bob@example.org"),
                      subject="Your order", html=HTML),
    "html + inline image + 20 KB pdf": dict(
        sender=("Shop", "shop@example.com"), to=("Bob", "bob@example.org"),
        subject="Your invoice", text="See the invoice.\n", html=HTML,
        files=[("invoice.pdf", PDF, None), ("logo.png", LOGO, "logo")]),
    "international": dict(sender=("Bücherstube Köln", "post@bücher.example"),
                          to=("Δοκιμή", "δοκιμή@example.test"),
                          subject="Ihre Bestellung: Grüße aus Köln — vielen Dank!",
                          text="Grüße,\nΚαλημέρα!\n" * 5),
}


def postroom(case: dict[str, Any]) -> Callable[[], bytes]:
    files = [Attachment(n, c, content_id=cid) for n, c, cid in case.get("files", [])]
    draft = Draft(from_=case["sender"], to=[case["to"]], subject=case["subject"],
                  text=case.get("text"), html=case.get("html"), attachments=files)
    return lambda: build(draft).raw


def stdlib(case: dict[str, Any]) -> Callable[[], bytes]:
    from email.headerregistry import Address

    def one() -> bytes:
        msg = EmailMessage()
        name, addr = case["sender"]
        local, _, domain = addr.partition("@")
        msg["From"] = Address(name, local, domain)
        tname, taddr = case["to"]
        tlocal, _, tdomain = taddr.partition("@")
        msg["To"] = Address(tname, tlocal, tdomain)
        msg["Subject"] = case["subject"]
        msg["Date"] = formatdate(localtime=True)
        msg["Message-ID"] = make_msgid(domain="example.com")
        if case.get("text") is not None:
            msg.set_content(case["text"])
        if case.get("html") is not None:
            if case.get("text") is None:
                msg.set_content(case["html"], subtype="html")
            else:
                msg.add_alternative(case["html"], subtype="html")
        for n, c, cid in case.get("files", []):
            main, sub = ("image", "png") if n.endswith(".png") else ("application", "pdf")
            if cid:
                msg.add_attachment(c, maintype=main, subtype=sub, filename=n, cid=f"<{cid}>",
                                   disposition="inline")
            else:
                msg.add_attachment(c, maintype=main, subtype=sub, filename=n)
        utf8 = not (addr.isascii() and taddr.isascii())
        return msg.as_bytes(policy=SMTPUTF8 if utf8 else SMTP)

    return one


def django(case: dict[str, Any]) -> Callable[[], bytes]:
    import django as dj
    from django.conf import settings

    if not settings.configured:
        settings.configure(EMAIL_BACKEND="django.core.mail.backends.locmem.EmailBackend",
                           DEFAULT_CHARSET="utf-8")
        dj.setup()
    from django.core.mail import EmailMultiAlternatives

    def one() -> bytes:
        msg = EmailMultiAlternatives(
            case["subject"], case.get("text") or "", "{} <{}>".format(*case["sender"]),
            ["{} <{}>".format(*case["to"])])
        if case.get("html") is not None:
            if case.get("text") is None:
                msg.body = case["html"]
                msg.content_subtype = "html"
            else:
                msg.attach_alternative(case["html"], "text/html")
        for n, c, _cid in case.get("files", []):
            msg.attach(n, c, "image/png" if n.endswith(".png") else "application/pdf")
        return bytes(msg.message().as_bytes())

    return one


PEERS: dict[str, Callable[[dict[str, Any]], Callable[[], bytes]]] = {
    "postroom build()": postroom, "stdlib EmailMessage": stdlib,
    "Django EmailMultiAlternatives": django,
}


def measure(fn: Callable[[], bytes], n: int) -> dict[str, float]:
    for _ in range(min(300, n)):
        fn()
    times: list[int] = []
    gc.collect()
    for _ in range(n):
        t = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t)
    times.sort()
    return {"p50": times[len(times) // 2] / 1000, "p99": times[int(len(times) * 0.99)] / 1000,
            "mean": statistics.fmean(times) / 1000}


def report(results: dict[str, dict[str, dict[str, float]]], n: int) -> str:
    load = os.getloadavg()
    lines = [BEGIN, "", "## Message composition: `build(Draft)` vs EmailMessage and Django", "",
             f"{n:,} calls per case and composer, one process, after 300 warm-up calls; "
             f"µs per message (p50 / p99). Load average at the end: {load[0]:.2f} "
             f"{load[1]:.2f} {load[2]:.2f} (2 cores, shared box). Ratio = the peer's p50 / "
             "Postroom's p50 (higher: Postroom faster). Postroom also derives the text part "
             "of the HTML-only message (most of its time there: the stdlib html.parser pass "
             "that makes the text); the peers send its HTML alone.", "",
             "| case | " + " | ".join(PEERS) + " | stdlib ratio | Django ratio |",
             "|---|" + "---|" * (len(PEERS) + 2)]
    for case, per in results.items():
        ours = per["postroom build()"]["p50"]
        cells = [f"{per[p]['p50']:.0f} / {per[p]['p99']:.0f}" for p in PEERS]
        lines.append(f"| {case} | " + " | ".join(cells)
                     + f" | {per['stdlib EmailMessage']['p50'] / ours:.1f}× | "
                     + f"{per['Django EmailMultiAlternatives']['p50'] / ours:.1f}× |")
    lines += ["", "Command: `.venv/bin/python bench/compose_bench.py`. The whole "
              "`build()` (validation, IDNA, encoding, Envelope) is inside Postroom's figure.",
              "", END]
    return "\n".join(lines) + "\n"


def write_block(text: str, out: Path) -> None:
    _report.write_block(NAME, text, out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=5000, help="calls per case and composer")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"),
                    help="markdown file for the report block ('-' = print only)")
    args = ap.parse_args()
    results: dict[str, dict[str, dict[str, float]]] = {}
    for case_name, case in CASES.items():
        results[case_name] = {}
        for peer, make in PEERS.items():
            results[case_name][peer] = measure(make(case), args.calls)
            r = results[case_name][peer]
            print(f"{case_name:34} {peer:30} p50 {r['p50']:7.1f} µs  p99 {r['p99']:7.1f} µs",
                  flush=True)
    text = report(results, args.calls)
    if args.out == "-":
        print(text)
    else:
        write_block(text, Path(args.out))
        print(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
