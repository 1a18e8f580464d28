// NextScale's frontend extension (ComfyUI frontend 1.32.x): a colour per NextScale socket type, the text of
// NextScale's KV reports and schedules shown on the node, widget labels from the inputs' display names, the VAR
// samplers' class menu limited to the connected generator's classes, and the pack's example workflows in the
// template browser under their own titles and descriptions.
import { api } from "../../../scripts/api.js";
import { app } from "../../../scripts/app.js";

// The pack's folder under custom_nodes: this file is served at /extensions/<pack>/js/nextscale.js.
const PACK = decodeURIComponent(new URL(import.meta.url).pathname.split("/").at(-3));

// One colour per socket type; the colour of a model socket is near the core type it plays the part of (MODEL,
// VAE, LATENT, CONTROL_NET).
const SOCKET_COLOURS = {
  NEXTSCALE_GENERATOR: "#9f86d8",
  NEXTSCALE_INFINITY: "#d17ad8",
  NEXTSCALE_SWITTI: "#c98fb8",
  NEXTSCALE_NSARM: "#8f6fd0",
  NEXTSCALE_DD: "#b48ee8",
  NEXTSCALE_HMAR: "#a07cc0",
  NEXTSCALE_FLEXVAR: "#7f7fe8",
  NEXTSCALE_TOKENIZER: "#e08a5c",
  NEXTSCALE_TOKENS: "#4fc4d8",
  NEXTSCALE_SAMPLER_OPTIONS: "#b0a08a",
  NEXTSCALE_GUIDE: "#a8d86e",
  NEXTSCALE_CONTROL: "#2fb38e",
  NEXTSCALE_CONTROL_MODEL: "#6f8fe0",
  NEXTSCALE_KV_POLICY: "#f2c14e",
  NEXTSCALE_KV_PROFILE: "#f28a8a",
  NEXTSCALE_ACCEL: "#e0d05c",
};

// Nodes whose ``ui.text`` output (ui.PreviewText) is shown in a read-only text box on the node.
const TEXT_NODES = new Set(["NextScaleKVReport", "NextScaleKVReportText", "NextScaleSchedule", "NextScaleFlexVARSchedule"]);
const TEXT_WIDGET = "shown_report";

/** A colour table that keeps the pack's colours: the frontend resets every socket type to its palette's colour
 * ("" where the palette has none) when a palette loads; a palette that names a NextScale type still wins. */
function keepColours(table) {
  for (const [type, colour] of Object.entries(SOCKET_COLOURS)) {
    let fromPalette = table[type] || "";
    Object.defineProperty(table, type, {
      enumerable: true,
      configurable: true,
      get: () => fromPalette || colour,
      set: (value) => {
        fromPalette = value || "";
      },
    });
  }
}

/** The same colours for the Vue node renderer, which reads --color-datatype-<type>. */
function colourStyle() {
  const rules = Object.entries(SOCKET_COLOURS).map(([type, colour]) => `--color-datatype-${type}: ${colour};`);
  const style = document.createElement("style");
  style.textContent = `:root { ${rules.join(" ")} }`;
  document.head.append(style);
}

// Sampler -> the input its generator comes in by; the class menu lists that generator's classes.
const CLASS_MENU_NODES = { NextScaleSampler: "generator", NextScaleCollaborativeSampler: "drafter" };
const classNames = new Map(); // generator choice -> Promise of its class names (null: unknown, keep every class)

/** The generator choice feeding ``node``'s input ``name``: up the links through NextScale Load LoRA (which passes
 * a generator on) to NextScale Load Generator; null when it comes from elsewhere or is not connected. */
function generatorChoice(node, name) {
  for (let hops = 0; node && hops < 16; hops++) {
    const origin = node.getInputNode(node.findInputSlot(name));
    if (origin?.type === "NextScaleLoadGenerator") {
      return origin.widgets?.find((w) => w.name === "generator_name")?.value ?? null;
    }
    if (origin?.type !== "NextScaleLoadLoRA") return null;
    [node, name] = [origin, "model"];
  }
  return null;
}

function generatorClasses(choice) {
  if (!classNames.has(choice)) {
    const query = new URLSearchParams({ generator: choice });
    const answer = api.fetchApi(`/nextscale/class_names?${query}`).then((r) => (r.ok ? r.json() : {}));
    classNames.set(choice, answer.then((body) => body.class_names ?? null));
  }
  return classNames.get(choice);
}

/** Limit the class menus of the graph's VAR samplers to their generator's classes (every class where those are
 * unknown). Only the menu changes: the saved value stays, and the server still validates against every class. */
async function refreshClassMenus() {
  for (const node of app.graph?._nodes ?? []) {
    const input = CLASS_MENU_NODES[node.type];
    const widget = input && node.widgets?.find((w) => w.name === "class_name");
    if (!widget) continue;
    widget.allClasses ??= widget.options.values;
    const choice = generatorChoice(node, input);
    const classes = choice ? await generatorClasses(choice) : null;
    if (generatorChoice(node, input) !== choice) continue; // rewired meanwhile: a later refresh sets it
    widget.options.values = classes ?? widget.allClasses;
  }
}

/** Widget labels from the schema's input display names (the frontend labels a widget by its input id). */
function labelWidgets(node, nodeData) {
  const specs = { ...nodeData.input?.required, ...nodeData.input?.optional };
  for (const widget of node.widgets ?? []) {
    const label = specs[widget.name]?.[1]?.display_name;
    if (label) widget.label = label;
  }
}

function addTextDisplay(node) {
  const box = document.createElement("textarea");
  box.className = "comfy-multiline-input";
  box.readOnly = true;
  box.placeholder = "the report appears here after a run";
  box.style.fontFamily = "monospace";
  box.style.whiteSpace = "pre";
  const widget = node.addDOMWidget(TEXT_WIDGET, "customtext", box, {
    getValue: () => box.value,
    setValue: (value) => {
      box.value = value;
    },
    serialize: false,
  });
  widget.serialize = false;
  node.setSize([Math.max(node.size[0], 560), Math.max(node.size[1], 300)]);
}

/** A description as the template browser shows it: it turns "-" and "_" into spaces, which would break file
 * names such as nextscale_example.png, so they become the look-alike U+2011 (non-breaking hyphen) and U+02CD. */
const keepMarks = (text) => text.replaceAll("-", "\u2011").replaceAll("_", "\u02cd");

/** The pack's templates as a template-index category, titled and described by each workflow's
 * ``extra.nextscale`` fields (the frontend would show the file names). */
async function packCategory(names) {
  const templates = await Promise.all(
    names.map(async (name) => {
      const path = `/workflow_templates/${encodeURIComponent(PACK)}/${encodeURIComponent(name)}.json`;
      const response = await api.fetchApi(path);
      const meta = response.ok ? ((await response.json()).extra?.nextscale ?? {}) : {};
      return {
        name,
        title: meta.title ?? name,
        description: keepMarks(meta.description ?? ""),
        mediaType: "image",
        mediaSubtype: "jpg",
      };
    }),
  );
  return { moduleName: PACK, title: "NextScale", type: "image", templates };
}

/** Lists the pack's templates with the core ones: the browser then shows them under Extensions -> <pack> with
 * their own titles, descriptions and thumbnails, and loads them from the pack as before. */
function titledTemplates() {
  const listCustom = api.getWorkflowTemplates.bind(api);
  const listCore = api.getCoreWorkflowTemplates.bind(api);
  let category = null;
  const ours = async () => {
    category ??= listCustom().then((all) => (all[PACK]?.length ? packCategory(all[PACK]) : null));
    return category;
  };
  api.getWorkflowTemplates = async () => {
    const all = await listCustom();
    if ((await ours()) !== null) delete all[PACK];
    return all;
  };
  api.getCoreWorkflowTemplates = async (locale) => {
    const [core, pack] = await Promise.all([listCore(locale), ours()]);
    return pack === null ? core : [...core, pack];
  };
}

/** Chain ``method`` of a node type's prototype: the original first, then ``after``. */
function chain(nodeType, method, after) {
  const original = nodeType.prototype[method];
  nodeType.prototype[method] = function () {
    const result = original?.apply(this, arguments);
    after.apply(this, arguments);
    return result;
  };
}

app.registerExtension({
  name: "NextScale.Interface",
  init() {
    titledTemplates();
  },
  afterConfigureGraph() {
    refreshClassMenus();
  },
  setup() {
    keepColours(app.canvas.default_connection_color_byType);
    keepColours(app.canvas.constructor.link_type_colors);
    colourStyle();
    app.canvas.setDirty(true, true);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const name = nodeData.name;
    if (!name.startsWith("NextScale")) return;
    chain(nodeType, "onNodeCreated", function () {
      labelWidgets(this, nodeData);
      if (TEXT_NODES.has(name)) addTextDisplay(this);
      const file = name === "NextScaleLoadGenerator" && this.widgets.find((w) => w.name === "generator_name");
      if (file) {
        const callback = file.callback;
        file.callback = function () {
          const result = callback?.apply(this, arguments);
          refreshClassMenus();
          return result;
        };
      }
    });
    if (name in CLASS_MENU_NODES || name === "NextScaleLoadLoRA") {
      chain(nodeType, "onConnectionsChange", () => refreshClassMenus());
    }
    if (TEXT_NODES.has(name)) {
      chain(nodeType, "onExecuted", function (output) {
        const widget = this.widgets?.find((w) => w.name === TEXT_WIDGET);
        if (widget && output?.text) widget.value = output.text.join("\n");
      });
    }
  },
});
