"""What an artist sees of the pack in the real frontend (1.32.9, headless Chromium), through the pack's extension
``web/js/nextscale.js``: the template browser's titles, descriptions and thumbnails, the reports shown on their
nodes, a colour per socket type, readable widget labels, the VAR samplers' class menu limited to the connected
generator's classes, the node search, and a non-square outpaint queued from the UI without an error dialog.
"""

from __future__ import annotations

import json

import pytest
from harness.examples import CLASSES, EXAMPLES, Graph, _models
from harness.testbed import WORKFLOWS_DIR, load_json

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

OPEN_PACK_TEMPLATES_JS = """async (pack) => {
    await app.extensionManager.command.execute("Comfy.BrowseTemplates");
    const dialog = await new Promise((resolve, reject) => {
        const t0 = Date.now();
        const poll = () => {
            const d = document.querySelector(".p-dialog");
            const entry = d && [...d.querySelectorAll("*")].find(
                (e) => e.children.length === 0 && e.textContent.trim() === pack);
            if (entry) { entry.click(); resolve(d); }
            else if (Date.now() - t0 > 30000) reject(new Error("no template category " + pack));
            else setTimeout(poll, 200);
        };
        poll();
    });
    await new Promise((r) => setTimeout(r, 1500));
    return [...dialog.querySelectorAll("h3[title]")].map((h) => {
        const card = h.closest("div:has(img)");
        const img = card && card.querySelector("img");
        return {title: h.getAttribute("title"), description: h.parentElement.parentElement.querySelector("p[title]")
                ?.getAttribute("title"), thumbnail: img ? img.naturalWidth : 0};
    });
}"""

SHOWN_TEXT_JS = """(type) => {
    const node = app.graph._nodes.find((n) => n.type === type);
    return node.widgets.find((w) => w.name === "shown_report").value;
}"""


def visible_dialogs(app_page) -> list[str]:
    return [d.inner_text() for d in app_page.page.locator(".p-dialog").all() if d.is_visible()]


def test_templates_show_their_own_titles_descriptions_and_thumbnails(app_page, comfy_server):
    cards = app_page.evaluate(OPEN_PACK_TEMPLATES_JS, comfy_server.pack_name)
    by_title = {card["title"]: card for card in cards}
    assert set(by_title) == {e.title for e in EXAMPLES.values()}, cards
    for example in EXAMPLES.values():
        card = by_title[example.title]
        # the browser turns "-" and "_" into spaces; the extension gives it look-alikes that it keeps
        shown = card["description"].replace("\u2011", "-").replace("\u02cd", "_")
        assert shown == example.description, card
        assert card["thumbnail"] > 0, f"{example.name}: thumbnail not loaded"


def test_a_template_opens_from_the_browser(app_page, comfy_server):
    app_page.evaluate(OPEN_PACK_TEMPLATES_JS, comfy_server.pack_name)
    app_page.page.locator("h3[title='NextScale: inpaint']").click()
    app_page.page.wait_for_function("() => app.graph._nodes.some((n) => n.type === 'NextScaleInpaintGuide')")
    types = {n["type"] for n in app_page.serialize()["nodes"]}
    assert types == {n["type"] for n in load_json(WORKFLOWS_DIR / "nextscale_inpaint.json")["nodes"]}


def test_reports_show_on_their_nodes(app_page, comfy_server):
    g = Graph()
    tok, gen = _models(g)
    policy = g.add("NextScaleKVPolicy", policy="recent", budget=0.5, profile_file="", drafters=1, decay=0.4,
                   contextual_fraction=0.5, contextual_ratio=0.25)
    g.add("NextScaleKVReport", generator=gen, tokenizer=tok, kv_policy=g.out(policy), class_name="heart", seed=77,
          cfg=4.0, batch_size=1)
    g.add("NextScaleSchedule", preset="custom", custom_schedule="1,2,3,5", depth=7)
    app_page.load_api_prompt(g.prompt)
    assert app_page.evaluate(SHOWN_TEXT_JS, "NextScaleSchedule") == ""
    entry = comfy_server.wait_history(app_page.queue_prompt(), timeout=300)
    assert comfy_server.status_of(entry) == "success", json.dumps(comfy_server.error_messages(entry))[:3000]
    classes = {nid: node["class_type"] for nid, node in entry["prompt"][2].items()}
    sent = {classes[nid]: "\n".join(text) for nid, text in comfy_server.output_texts(entry).items()}
    for node_type in ("NextScaleKVReport", "NextScaleSchedule"):
        app_page.page.wait_for_function(f"() => !!({SHOWN_TEXT_JS})('{node_type}')")
        assert app_page.evaluate(SHOWN_TEXT_JS, node_type) == sent[node_type]
    assert "VAR-d7" in sent["NextScaleSchedule"] and "PSNR" in sent["NextScaleKVReport"]
    # the shown text is neither saved with the workflow nor sent as an input
    saved = {n["type"]: n.get("widgets_values") for n in app_page.serialize()["nodes"]}
    assert saved["NextScaleSchedule"] == ["custom", "1,2,3,5", 7]
    assert all("shown_report" not in node["inputs"] for node in app_page.graph_to_prompt().values())


def test_every_nextscale_socket_type_has_its_own_colour(app_page, object_info):
    types = sorted({t for info in object_info.values() for union in info["output"] for t in union.split(",")
                    if t.startswith("NEXTSCALE_")})
    read = ("(types) => types.map((t) => [LGraphCanvas.link_type_colors[t], "
            "app.canvas.default_connection_color_byType[t]])")
    colours = app_page.evaluate(read, types)
    assert all(link and link == slot for link, slot in colours), dict(zip(types, colours))
    assert len({link for link, _ in colours}) == len(types), dict(zip(types, colours))
    # a palette change resets every type the palette does not name; the pack's colours stay
    app_page.evaluate("async () => { await app.extensionManager.setting.set('Comfy.ColorPalette', 'light'); }")
    app_page.page.wait_for_timeout(500)
    assert app_page.evaluate(read, types) == colours


def test_widgets_are_labelled_by_their_display_names(app_page, object_info):
    expected = {
        node_id: {name: spec[1]["display_name"] for name, spec in info["input"].get("required", {}).items()
                  if isinstance(spec[1], dict) and spec[1].get("display_name")}
        for node_id, info in object_info.items() if node_id.startswith("NextScaleLoad")
    }
    assert expected["NextScaleLoadGenerator"]["generator_name"] == "generator"
    labels = app_page.evaluate("""(types) => Object.fromEntries(types.map((t) => [t, Object.fromEntries(
        LiteGraph.createNode(t).widgets.map((w) => [w.name, w.label]))]))""", sorted(expected))
    for node_id, names in expected.items():
        for name, label in names.items():
            assert labels[node_id][name] == label, (node_id, labels[node_id])


SEARCHES = {
    "var sampler": "NextScale Sampler (VAR)",
    "VAR": "NextScale Sampler (VAR)",
    "Infinity": "NextScale Load Infinity",
    "next-scale": "NextScale Sampler (VAR)",
    "nextscale decode": "NextScale Decode",
}


@pytest.mark.parametrize("query", SEARCHES)
def test_node_search_finds_the_nodes(app_page, query):
    page = app_page.page
    app_page.evaluate("async () => { await app.extensionManager.command.execute('Workspace.SearchBox.Toggle'); }")
    box = page.locator(".comfy-vue-node-search-container input").first
    box.fill(query)
    page.wait_for_timeout(1000)
    found = [t.split("\n")[0].strip() for t in page.locator(".p-autocomplete-option").all_inner_texts()]
    assert SEARCHES[query] in found, found


def test_non_square_outpaint_from_the_ui_shows_no_error(app_page, comfy_server):
    workflow = load_json(WORKFLOWS_DIR / "nextscale_outpaint.json")
    for node in workflow["nodes"]:
        if node["type"] == "ImagePadForOutpaint":  # left, top, right, bottom, feathering
            node["widgets_values"][:4] = [16, 0, 16, 0]
        if node["type"] == "NextScaleEncode":
            node["widgets_values"][0] = "pad"
    app_page.load_workflow(workflow)
    entry = comfy_server.wait_history(app_page.queue_prompt(), timeout=300)
    assert comfy_server.status_of(entry) == "success", json.dumps(comfy_server.error_messages(entry))[:3000]
    app_page.page.wait_for_timeout(500)
    assert visible_dialogs(app_page) == []


CLASS_MENUS_JS = """() => app.graph._nodes.filter((n) => n.type === "NextScaleSampler").map((n) => {
    const w = n.widgets.find((w) => w.name === "class_name");
    return {value: w.value, classes: [...w.options.values]};
})"""


def test_class_menu_lists_the_connected_generators_classes(app_page, object_info):
    every_class = object_info["NextScaleSampler"]["input"]["required"]["class_name"][1]["options"]
    embedded = [name.strip() for name in CLASSES.split(",")]
    # through NextScale Load LoRA too: both samplers of the LoRA example get the embedded generator's ten classes
    app_page.load_workflow(load_json(WORKFLOWS_DIR / "nextscale_lora.json"))
    app_page.page.wait_for_function(f"() => ({CLASS_MENUS_JS})().every((m) => m.classes.length === {len(embedded)})")
    menus = app_page.evaluate(CLASS_MENUS_JS)
    assert [m["classes"] for m in menus] == [embedded, embedded] and menus[0]["value"] == "circle"
    # without a generator the menu offers every class again, and the saved value is untouched
    app_page.evaluate("""() => { for (const n of app.graph._nodes.filter((n) => n.type === "NextScaleSampler"))
        n.disconnectInput(n.findInputSlot("generator")); }""")
    app_page.page.wait_for_function(f"() => ({CLASS_MENUS_JS})().every((m) => m.classes.length === {len(every_class)})")
    assert all(m["value"] == "circle" for m in app_page.evaluate(CLASS_MENUS_JS))
