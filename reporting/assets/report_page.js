/* report.html's behaviour; report_page.py inlines this file. Plain JS, no library, nothing from the network.
   Per category: the threshold slider and its live figures, the histogram and ROC, the gallery with its
   sort and filters, and one lightbox for the full heatmap panels. An image is flagged (called defective)
   when its score >= the threshold, as metrics.rates_at decides. */
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("report-data").textContent);
  const SVG = "http://www.w3.org/2000/svg";

  const encodePath = (path) => path.split("/").map(encodeURIComponent).join("/");
  const pct = (x) => (x === null ? "n/a" : (100 * x).toFixed(2) + " %");
  const short = (x) => (x === null ? "none" : String(Number(x.toPrecision(5))));  // null: a value that was not finite
  const OUTCOME_TEXT = { "false-alarm": "false alarm", missed: "missed defect", correct: "correct", flagged: "flagged", passed: "passed" };

  function svg(parent, tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = text;
    parent.appendChild(node);
    return node;
  }

  function setUp(section, data) {
    const n = data.score.length;
    const base = encodePath(data.base);
    const state = { data, threshold: data.start, items: [], order: [], flagged: new Array(n).fill(null) };
    const find = (selector) => section.querySelector(selector);
    const slider = find(".slider");
    const box = find(".threshold-value");
    const [lo, hi] = data.range;
    const digits = Math.max(0, -Math.floor(Math.log10((hi - lo) / 1000)));  // slider positions: span/1000 or finer

    state.heatmap = (i) => base + "anomaly_maps/" + encodePath(data.names[i]);
    state.isFlagged = (i) => data.score[i] !== null && data.score[i] >= state.threshold;  // as metrics.rates_at: score >= threshold is defective
    state.outcome = (i) => {
      const flagged = state.isFlagged(i);
      if (!data.labelled) return flagged ? "flagged" : "passed";
      if (data.label[i] === 0) return flagged ? "false-alarm" : "correct";
      return flagged ? "correct" : "missed";
    };
    state.describe = (i) => {
      const kind = data.labelled ? data.defects[data.defect[i]] + ", " : "";
      return `${data.names[i]} (${kind}score ${short(data.score[i])}): ${OUTCOME_TEXT[state.outcome(i)]} at threshold ${short(state.threshold)}`;
    };

    // the gallery: one link per image, its thumbnail loaded only when it comes near the viewport
    const gallery = find(".gallery");
    const fragment = document.createDocumentFragment();
    for (let i = 0; i < n; i++) {
      const name = data.names[i];
      const item = document.createElement("a");
      item.className = "item";
      item.href = state.heatmap(i);
      item.dataset.i = String(i);
      item.dataset.name = name;
      if (data.labelled) item.dataset.defect = data.defects[data.defect[i]];
      const img = document.createElement("img");
      img.loading = "lazy";
      img.decoding = "async";
      img.alt = name;
      img.src = base + encodePath(data.thumbs[i]);  // named in Python (report_page.thumbnail_name)
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = name;
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = short(data.score[i]);
      item.append(img, label, score);
      item.addEventListener("click", (event) => {
        if (event.button !== 0 || event.ctrlKey || event.metaKey || event.shiftKey) return;  // a new tab: the browser's
        event.preventDefault();
        openLightbox(state, i);
      });
      state.items.push(item);
      fragment.appendChild(item);
    }
    gallery.appendChild(fragment);

    // plots: the histogram with the marks and the current threshold; the ROC with the current point
    const hist = find(".hist");
    const x0 = 40, x1 = 410, y0 = 190, y1 = 24;
    const xOf = (value) => x0 + ((value - lo) / (hi - lo)) * (x1 - x0);
    const bins = 30;
    const count = (keep) => {
      const counts = new Array(bins).fill(0);
      for (let i = 0; i < n; i++) if (keep(i)) counts[Math.min(bins - 1, Math.floor(((data.score[i] - lo) / (hi - lo)) * bins))]++;
      return counts;
    };
    const groups = data.labelled
      ? [["good", (i) => data.label[i] === 0, "good"], ["defective", (i) => data.label[i] === 1, "defective"]]
      : [["images", () => true, "unlabelled"]];
    const histograms = groups.map(([name, keep, cls]) => [name, count(keep), cls]);
    const top = Math.max(1, ...histograms.flatMap(([, counts]) => counts));
    const width = (x1 - x0) / bins;
    histograms.forEach(([name, counts, cls], g) => {
      counts.forEach((c, b) => {
        if (c) svg(hist, "rect", { class: cls, x: x0 + b * width, width: width - 1, y: y0 - ((y0 - y1) * c) / top, height: ((y0 - y1) * c) / top });
      });
      svg(hist, "text", { class: "legend " + cls, x: x1, y: 12 + 12 * g, "text-anchor": "end" }, `${name} (${counts.reduce((a, b) => a + b, 0)})`);
    });
    svg(hist, "line", { class: "axis", x1: x0, x2: x1, y1: y0, y2: y0 });
    svg(hist, "text", { x: x0, y: y0 + 14, "text-anchor": "start" }, short(lo));
    svg(hist, "text", { x: x1, y: y0 + 14, "text-anchor": "end" }, short(hi));
    svg(hist, "text", { x: (x0 + x1) / 2, y: y0 + 26, "text-anchor": "middle" }, "image anomaly score");
    svg(hist, "text", { x: x0 - 4, y: y1 + 4, "text-anchor": "end" }, String(top));
    data.marks.forEach(([name, value], m) => {
      svg(hist, "line", { class: "mark", x1: xOf(value), x2: xOf(value), y1: y0, y2: y1 - 4 });
      svg(hist, "text", { class: "mark", x: xOf(value) + 2, y: y1 + 8 + 10 * m }, name);
    });
    const current = svg(hist, "line", { class: "current", y1: y0, y2: y1 - 8 });

    let rocPoint = null;
    const roc = find(".roc");
    if (roc) {
      const nGood = data.label.filter((y) => y === 0).length;
      const nBad = n - nGood;
      const rx = (f) => 30 + 200 * f, ry = (t) => 210 - 200 * t;
      svg(roc, "rect", { class: "frame", x: 30, y: 10, width: 200, height: 200 });
      svg(roc, "line", { class: "chance", x1: rx(0), y1: ry(0), x2: rx(1), y2: ry(1) });
      svg(roc, "text", { x: 130, y: 236, "text-anchor": "middle" }, "false-alarm rate");
      svg(roc, "text", { x: 12, y: 110, "text-anchor": "middle", transform: "rotate(-90 12 110)" }, "recall");
      if (nGood && nBad) {
        const order = [...Array(n).keys()].sort((a, b) => data.score[b] - data.score[a]);
        const points = [[0, 0]];
        let fp = 0, tp = 0;
        order.forEach((i, k) => {
          if (data.label[i] === 1) tp++; else fp++;
          if (k === n - 1 || data.score[order[k + 1]] !== data.score[i]) points.push([fp / nGood, tp / nBad]);
        });
        svg(roc, "polyline", { class: "curve", points: points.map(([f, t]) => `${rx(f)},${ry(t)}`).join(" ") });
        rocPoint = { node: svg(roc, "circle", { class: "current", r: 4 }), rx, ry };
      }
    }

    // the live figures
    const field = (selector) => find(selector);
    const perDefect = [...section.querySelectorAll(".per-defect")];
    function update() {
      let flaggedAll = 0, good = 0, goodFlagged = 0, bad = 0, badFlagged = 0;
      const byDefect = data.labelled ? data.defects.map(() => [0, 0]) : [];
      for (let i = 0; i < n; i++) {
        const flagged = state.isFlagged(i);
        if (flagged) flaggedAll++;
        if (data.labelled) {
          if (data.label[i] === 0) { good++; if (flagged) goodFlagged++; } else { bad++; if (flagged) badFlagged++; }
          byDefect[data.defect[i]][0]++;
          if (flagged) byDefect[data.defect[i]][1]++;
        }
        if (state.flagged[i] !== flagged) {
          state.flagged[i] = flagged;
          state.items[i].dataset.outcome = state.outcome(i);
        }
      }
      field(".flagged").textContent = `${flaggedAll} of ${n} images` + (data.labelled ? "" : ` (${pct(n ? flaggedAll / n : null)})`);
      if (data.labelled) {
        const fpr = good ? goodFlagged / good : null;
        const recall = bad ? badFlagged / bad : null;
        const put = (selector, value, text) => {
          const node = field(selector);
          node.textContent = pct(value);
          node.dataset.value = value === null ? "" : String(value);
          field(selector + "-count").textContent = text;
        };
        put(".fpr", fpr, `(${goodFlagged} of ${good} good)`);
        put(".recall", recall, `(${badFlagged} of ${bad} defective)`);
        field(".tn").textContent = good - goodFlagged;
        field(".fp").textContent = goodFlagged;
        field(".fn").textContent = bad - badFlagged;
        field(".tp").textContent = badFlagged;
        perDefect.forEach((cell) => {
          const [all, flagged] = byDefect[data.defects.indexOf(cell.dataset.defect)];
          cell.textContent = `${flagged} of ${all} (${pct(all ? flagged / all : null)})`;
        });
        if (rocPoint && fpr !== null && recall !== null) {
          rocPoint.node.setAttribute("cx", rocPoint.rx(fpr));
          rocPoint.node.setAttribute("cy", rocPoint.ry(recall));
        }
      }
      const x = Math.min(x1, Math.max(x0, xOf(state.threshold)));
      current.setAttribute("x1", x);
      current.setAttribute("x2", x);
      applyFilters();
    }

    // sort and filters
    const sortBy = find(".sort");
    const defectFilter = find(".filter-defect");
    const outcomeFilter = find(".filter-outcome");
    const shown = find(".shown");
    function applyFilters() {
      const defect = defectFilter ? defectFilter.value : "all";
      const outcome = outcomeFilter.value;
      let visible = 0;
      for (let i = 0; i < n; i++) {
        const item = state.items[i];
        const keep = (defect === "all" || item.dataset.defect === defect) && (outcome === "all" || item.dataset.outcome === outcome);
        if (item.hidden === keep) item.hidden = !keep;
        if (keep) visible++;
      }
      shown.textContent = `showing ${visible} of ${n}`;
    }
    function applySort() {
      const key = sortBy.value;
      const order = [...Array(n).keys()];  // Array.sort is stable: equal scores keep the files' order
      if (key === "score-desc") order.sort((a, b) => data.score[b] - data.score[a]);
      else if (key === "score-asc") order.sort((a, b) => data.score[a] - data.score[b]);
      else order.sort((a, b) => (data.names[a] < data.names[b] ? -1 : data.names[a] > data.names[b] ? 1 : 0));
      state.order = order;
      gallery.append(...order.map((i) => state.items[i]));
    }
    sortBy.addEventListener("change", applySort);
    if (defectFilter) defectFilter.addEventListener("change", applyFilters);
    outcomeFilter.addEventListener("change", applyFilters);

    // the threshold: the slider (positions rounded to span/1000 or finer), the number box (exact), the marks (exact)
    function setThreshold(value, from) {
      if (!Number.isFinite(value)) return;
      state.threshold = value;
      if (from !== "box") box.value = String(value);
      if (from !== "slider") slider.value = String(value);
      update();
    }
    slider.addEventListener("input", () => setThreshold(parseFloat(parseFloat(slider.value).toFixed(digits)), "slider"));
    slider.addEventListener("keydown", (event) => {
      const steps = { ArrowRight: 1, ArrowUp: 1, ArrowLeft: -1, ArrowDown: -1, PageUp: 10, PageDown: -10 }[event.key];
      if (!steps) return;
      event.preventDefault();
      const value = Math.min(hi, Math.max(lo, state.threshold + (steps * (hi - lo)) / 200));
      setThreshold(parseFloat(value.toFixed(digits)), "key");
    });
    box.addEventListener("input", () => setThreshold(parseFloat(box.value), "box"));
    section.querySelectorAll("button.mark").forEach((button) => {
      button.addEventListener("click", () => setThreshold(parseFloat(button.dataset.value), "mark"));
    });

    applySort();
    update();
    return state;
  }

  // the lightbox: one full panel at a time, in the gallery's order, among the images shown
  const lightbox = document.getElementById("lightbox");
  const lightImage = lightbox.querySelector("img");
  const lightCaption = lightbox.querySelector(".caption");
  let open = null;
  function show() {
    const { state, list, position } = open;
    const i = list[position];
    lightImage.src = state.heatmap(i);
    lightImage.alt = state.data.names[i];
    lightCaption.textContent = `${position + 1} of ${list.length}: ${state.describe(i)}`;
  }
  function openLightbox(state, i) {
    const list = state.order.filter((k) => !state.items[k].hidden);
    open = { state, list, position: Math.max(0, list.indexOf(i)) };
    show();
    lightbox.hidden = false;
  }
  function closeLightbox() {
    lightbox.hidden = true;
    lightImage.removeAttribute("src");
    open = null;
  }
  lightbox.addEventListener("click", (event) => { if (event.target === lightbox) closeLightbox(); });
  document.addEventListener("keydown", (event) => {
    if (!open) return;
    if (event.key === "Escape") closeLightbox();
    else if (event.key === "ArrowRight" || event.key === "ArrowLeft") {
      open.position = (open.position + (event.key === "ArrowRight" ? 1 : -1) + open.list.length) % open.list.length;
      show();
    }
  });

  const sections = document.querySelectorAll("section.category");
  DATA.forEach((data, k) => setUp(sections[k], data));
  document.documentElement.dataset.ready = "true";
  window.reportReady = performance.now();
})();
