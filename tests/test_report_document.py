"""The report's document model and its two renderers, and the typed records the report reads.

Renderers are checked with outside parsers: Python's ``html.parser`` for the HTML page and markdown-it
(CommonMark + GFM tables) for the Markdown; every string must come back exactly as written."""

from __future__ import annotations

import html.parser
import json
import sqlite3

import pytest
from markdown_it import MarkdownIt

from archifactory.results import FinalRecord, RunRecord, RunSummary
from archifactory.sweep import stats as st
from archifactory.sweep.report import read_sweep_results
from archifactory.sweep.report.document import (
    BulletList,
    Code,
    CodeBlock,
    Details,
    Document,
    Figure,
    Mark,
    Paragraph,
    Section,
    Strong,
    Table,
    render_html,
    render_markdown,
)
from archifactory.sweep.store import Store

HOSTILE = ["<script>alert(1)</script>", "a & b \"q\" 'q'", "$x^2$ *em* _u_ [l](http://x)", "| pipe ` tick",
           "- 1. # not a list", "</td></tr></table>", "{{ not_jinja }} {% raw %}"]


class _TextCollector(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def hostile_document() -> Document:
    png = b"\x89PNG\r\n\x1a\nnot really"
    return Document(HOSTILE[0], [
        Paragraph([HOSTILE[1], Code(HOSTILE[3]), Strong(HOSTILE[2])], "meta"),
        BulletList([[Mark(True), " ", Strong(HOSTILE[4]), f": {HOSTILE[5]}"], HOSTILE[6]], "checks"),
        Section(HOSTILE[2], [
            Table(["name", "value\nunit"], [[h, "1.0\n[0.9, 1.1]"] for h in HOSTILE], numeric={1},
                  notes_header="note", notes=[f"{h}.dotted.key" for h in HOSTILE]),
            Section(HOSTILE[5], [CodeBlock("\n".join(HOSTILE))], badge="failed"),
            Figure("fig", HOSTILE[1], HOSTILE[2], png),
            Details(HOSTILE[6], [Paragraph(HOSTILE[0])]),
        ]),
    ])


def test_html_shows_every_string_as_written_and_adds_no_markup():
    page = render_html(hostile_document())
    parser = _TextCollector()
    parser.feed(page)
    text = "".join(parser.text)
    for h in HOSTILE:
        assert h in text, h
    assert "script" not in parser.tags and "<script>" not in page
    assert parser.tags.count("table") == 1 and parser.tags.count("h2") == 1 and parser.tags.count("h3") == 1
    assert page.count("<figure") == 1 and 'src="data:image/png;base64,iVBORw0KGgpub3QgcmVhbGx5"' in page
    assert "{{ not_jinja }}" in page  # user text is data, never a template
    # dotted keys in a note may break after each dot, and nowhere else is markup inserted into user text
    assert "dotted.<wbr>key" in page


def test_markdown_shows_every_string_as_written():
    doc = hostile_document()
    markdown = render_markdown(doc, {"fig": "report_files/fig.png"})
    tokens = MarkdownIt("commonmark").enable(["table", "strikethrough"]).parse(markdown)
    assert not [t for t in tokens if t.type in ("html_block", "html_inline")]
    inline = [c for t in tokens if t.type == "inline" for c in t.children]
    assert not [c for c in inline if c.type in ("link_open", "s_open", "html_inline", "image")
                and c.attrs.get("src") != "report_files/fig.png"]
    kinds = [c.type for c in inline]
    assert kinds.count("em_open") == 1 and kinds.count("strong_open") == 2  # the caption; the two Strong parts
    shown = "".join(c.content for c in inline if c.type in ("text", "code_inline"))
    shown += "".join(t.content for t in tokens if t.type == "fence")
    for h in HOSTILE:
        assert h in shown, h
    headings = [t.tag for t in tokens if t.type == "heading_open"]
    assert headings == ["h1", "h2", "h3", "h3"]  # title, section, nested section, details as a subsection
    rows = [t for t in tokens if t.type == "tr_open"]
    assert len(rows) == 1 + len(HOSTILE)  # one row per table row: no pipe split a cell
    assert "![" in markdown and "(report_files/fig.png)" in markdown


def test_both_renderers_walk_the_same_document():
    """A block type added to one renderer and not the other fails here."""
    class Unknown:
        kind = "unknown"

    with pytest.raises(TypeError, match="not a report block"):
        render_markdown(Document("t", [Unknown()]), {})
    with pytest.raises(TypeError, match="not a report block"):
        render_html(Document("t", [Section("s", [Unknown()])]))


# ------------------------------------------------------------------------------------- the records


def _store_with_one_run(tmp_path, changes, env_summary: dict) -> Store:
    store = Store(tmp_path / "results.sqlite")
    store.set_sweep("s", "name: s\n", {"device": "cpu"})
    config = {"train": {"seq_len": 64, "max_tokens": 100, "seed": 0}}
    store.add_run("b-s0", "b", 0, None, True, config, changes, "runs/b-s0")
    store.record_results("b-s0", [{"kind": "eval", "step": 0, "tokens": 0, "val_loss": 5.0}],
                         {"val_loss": 4.5, "val_bpb": 2.0, "tokens": 100, "flops_per_token_train": 6e6,
                          "stream_hash": "abc", **env_summary})
    return store


def test_records_carry_the_store_columns_with_json_parsed_once(tmp_path):
    store = _store_with_one_run(
        tmp_path, {"overrides": {"model.d_model": 64, "name": "x"}, "description": "d", "match_params": None},
        {"device": "cpu", "precision": "fp32", "kernel_paths": {"0": "torch"}, "world_size": 1,
         "corpus_fingerprint": "cf"})
    data = read_sweep_results(tmp_path)
    run, final = data.runs[0], data.finals[0]
    assert isinstance(run, RunRecord) and isinstance(final, FinalRecord)
    with sqlite3.connect(store.path) as db:
        db.row_factory = sqlite3.Row
        raw_run = dict(db.execute("SELECT * FROM runs").fetchone())
        raw_final = dict(db.execute("SELECT * FROM final JOIN runs USING (run_id)").fetchone())
    assert run.config == json.loads(raw_run["config_json"]) and run.config["train"]["seq_len"] == 64
    assert run.changes.overrides == ["model.d_model=64", "name=x"] and run.changes.description == "d"
    assert run.env.kernel_paths == {"0": "torch"} and run.env.precision == "fp32"
    assert run.stage == "pretrain"  # a store without the stage column
    assert final.summary.model_dump(exclude_unset=True) == json.loads(raw_final["summary_json"])
    assert final.summary.corpus_fingerprint == "cf" == final.summary["corpus_fingerprint"]
    # every scalar column keeps its name and value: the summary's keys
    for key in ("run_id", "variant", "seed", "val_loss", "val_bpb", "tokens", "flops_per_token_train", "stream_hash"):
        assert final[key] == raw_final[key] == final.get(key)
    assert final.get("no_such_column", "default") == "default"
    with pytest.raises(KeyError):
        final["no_such_column"]
    # the store's reads are the records the report holds
    assert data.runs == store.runs() and data.finals == store.finals()
    assert st.fairness(data.runs, data.finals, "") == st.fairness(store.runs(), store.finals(), "")
    assert data.sweep.env == {"device": "cpu"} and data.seq_len() == 64


def test_records_read_damaged_json_columns_as_empty(tmp_path):
    store = _store_with_one_run(tmp_path, {"overrides": ["a=1"]}, {})
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE runs SET config_json='{not json', changes_json='[1, 2]', env_json=''")
        db.execute("UPDATE final SET summary_json='null'")
    data = read_sweep_results(tmp_path)
    run = data.runs[0]
    assert run.config == {} and run.changes.overrides == [] and run.env is None
    assert data.finals[0].summary == RunSummary()
