// Runs the tree page's own script (experiments/tree_html.py) twice under a stub DOM, as a live
// page reloads: first load, "fit", a scroll, then a reload with the hash the first load left.
// Prints one JSON line: the zoom and scroll after fit and after the reload, and whether the
// selected node was scrolled into view on each load. Used by tests/test_tree_plot.py.
//     node tests/js/tree_page_view.js PAGE.html
"use strict";
const fs = require("fs");
const html = fs.readFileSync(process.argv[2], "utf8");
const data = html.match(/<script type="application\/json" id="tree-data">([\s\S]*?)<\/script>/)[1];
const script = html.split("<script>\n")[1].split("</script>")[0];
const width = html.match(/data-width="([\d.]+)"/)[1], height = html.match(/data-height="([\d.]+)"/)[1];
globalThis.location = {hash: "", reload() {}};
globalThis.history = {replaceState(state, title, hash) { location.hash = hash; }};
let pending = [];
globalThis.setTimeout = fn => { pending.push(fn); return pending.length; };
globalThis.clearTimeout = () => {};

function load() {
  const elements = {}, log = {scrolledIntoView: false};
  const element = id => ({
    id, textContent: "", dataset: {width, height}, attrs: {}, listeners: {}, scrollLeft: 0, scrollTop: 0,
    clientWidth: 1200, clientHeight: 700, classList: {add() {}, remove() {}},
    setAttribute(key, value) { this.attrs[key] = value; }, append() {}, replaceChildren() {},
    addEventListener(name, fn) { this.listeners[name] = fn; },
    insertRow() { return {insertCell() { return {}; }}; },
    scrollIntoView() { log.scrolledIntoView = true; },
  });
  globalThis.document = {
    getElementById: id => id === "tree-data" ? {textContent: data} : (elements[id] ||= element(id)),
    querySelectorAll: () => [], querySelector: () => element("shape"), createElement: element,
  };
  pending = [];
  const zoom = new Function(script + "\nreturn () => zoom;")();
  return {elements, log, zoom};
}

const first = load();
first.elements["zoom-fit"].onclick();
const canvas = first.elements["canvas"];
canvas.scrollLeft = 40; canvas.scrollTop = 25;
const before = pending.length;
canvas.listeners.scroll();
pending.slice(before).forEach(fn => fn());  // what the scroll scheduled (saving the view), not the reload
const fitZoom = first.zoom();
const second = load();
console.log(JSON.stringify({
  width: Number(width), fit_zoom: fitZoom, first_scrolled_into_view: first.log.scrolledIntoView,
  hash: location.hash, reload_zoom: second.zoom(), reload_scroll: [second.elements["canvas"].scrollLeft,
  second.elements["canvas"].scrollTop], reload_scrolled_into_view: second.log.scrolledIntoView,
}));
