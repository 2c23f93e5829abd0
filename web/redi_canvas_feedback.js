// ReDi canvas feedback (served from /extensions/<pack folder>/ through the pack's WEB_DIRECTORY).
//
// 1. Nodes that report a run (BuildKnowledgeBase, ReDiRetrieve, ReDiResumeSample, ReDiSampler, ReDiLearningSampler,
//    ReDiCalibrateSampler, ReDiCalibratedSampler)
//    get a read-only "summary" box. It is there from the start (so templates lay out with it and
//    nothing moves after a run) and shows the `text` of the node's ui output when it finishes.
//    ComfyUI draws the `images` of a ui output (ReDiRetrieve's neighbours) by itself.
// 2. When a node's ui output carries `redi_kb` (a knowledge base was written), the node
//    definitions are refreshed, so ReDiLoadKnowledgeBase lists the new KB without a manual refresh.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

// Node types that get the summary box. A pack node not listed here that sends `text` gets the
// box on its first run instead.
const SUMMARY_NODES = new Set(["BuildKnowledgeBase", "ReDiRetrieve", "ReDiResumeSample", "ReDiSampler", "ReDiLearningSampler",
                               "ReDiCalibrateSampler", "ReDiCalibratedSampler"]);
const SUMMARY_WIDGET = "redi_summary";
const SUMMARY_HEIGHT = 96;
const PLACEHOLDER = "The run summary appears here when this node has run.";

// ComfyUI names a pack node's python_module "custom_nodes.<folder>"; this file is served from
// /extensions/<folder>/, so the pack's own nodes are recognised whatever the folder is called.
const PACK_FOLDER = decodeURIComponent(new URL(import.meta.url).pathname.split("/")[2] ?? "");
const isPackNode = (nodeData) =>
  SUMMARY_NODES.has(nodeData.name) || nodeData.python_module === `custom_nodes.${PACK_FOLDER}`;

function summaryWidget(node) {
  const existing = node.widgets?.find((w) => w.name === SUMMARY_WIDGET);
  if (existing) return existing;
  const box = document.createElement("textarea");
  box.readOnly = true;
  box.placeholder = PLACEHOLDER;
  box.className = "comfy-multiline-input redi-summary";
  box.style.fontSize = "11px";
  box.style.whiteSpace = "pre-wrap";
  box.style.opacity = "0.9";
  // Not a widget value: never saved in the workflow nor sent with the prompt.
  const widget = node.addDOMWidget(SUMMARY_WIDGET, "redi_summary", box, {
    serialize: false,
    getValue: () => box.value,
    setValue: (v) => { box.value = v ?? ""; },
    getMinHeight: () => SUMMARY_HEIGHT,
    getMaxHeight: () => SUMMARY_HEIGHT,
  });
  widget.serialize = false;
  return widget;
}

function grow(node) {
  const [w, h] = node.computeSize();
  if (w > node.size[0] || h > node.size[1]) node.setSize([Math.max(w, node.size[0]), Math.max(h, node.size[1])]);
}

app.registerExtension({
  name: "ReDi.CanvasFeedback",

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!isPackNode(nodeData)) return;
    const reserve = SUMMARY_NODES.has(nodeData.name);
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      if (reserve) {
        summaryWidget(this);
        grow(this);
      }
      return r;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (!text?.length) return;
      const widget = summaryWidget(this);
      widget.value = Array.isArray(text) ? text.join("\n") : String(text);
      grow(this);
      this.setDirtyCanvas?.(true, true);
    };
  },

  async setup() {
    api.addEventListener("executed", ({ detail }) => {
      if (detail?.output?.redi_kb?.length) app.refreshComboInNodes();
    });
  },
});
