// The biolit-id page: identify photos, browse species, curate the gallery.
// Talks only to this server's JSON API (/v1/). The API key lives in memory
// and sessionStorage and is sent only as an Authorization header. Every
// piece of server data is inserted as text (never as HTML).
"use strict";

(function () {
  const STRINGS = window.BIOLIT_I18N;
  const NUM_SIMILAR = 6;
  const TOP_K = 5;
  const PAGE_SIZE = 12;
  const state = {
    lang: pickLanguage(),
    key: sessionStorage.getItem("biolit-key") || "",
    openServer: false,  // the server answered without a key: it has no keys
    info: null,
    species: [],        // ListSpecies, for the type-ahead and the names
    speciesPage: { name: "", tokens: [""], index: 0 },
  };

  // ------------------------------------------------------------ helpers

  function pickLanguage() {
    const saved = localStorage.getItem("biolit-lang");
    if (saved === "fr" || saved === "en") return saved;
    return (navigator.language || "fr").toLowerCase().startsWith("en") ? "en" : "fr";
  }

  function t(key, values) {
    let text = (STRINGS[state.lang] && STRINGS[state.lang][key]) || STRINGS.en[key] || key;
    for (const [name, value] of Object.entries(values || {})) {
      text = text.split("{" + name + "}").join(String(value));
    }
    return text;
  }

  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const $ = (id) => document.getElementById(id);

  class ApiError extends Error {
    constructor(code, message, status) {
      super(message);
      this.code = code;
      this.status = status;
    }
  }

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    if (state.key) headers.Authorization = "Bearer " + state.key;
    let payload;
    if (body instanceof FormData) payload = body;
    else if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      payload = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, { method, headers, body: payload, credentials: "omit",
                                     cache: "no-store" });
    } catch (err) {
      throw new ApiError("UNAVAILABLE", String(err), 0);
    }
    let data = null;
    try { data = await response.json(); } catch (_) { data = null; }
    if (!response.ok) {
      throw new ApiError((data && data.code) || "UNKNOWN",
                         (data && data.message) || response.statusText, response.status);
    }
    return data;
  }

  function errorText(err) {
    const code = err.code || "UNKNOWN";
    let head = t("error." + code);
    if (code === "INVALID_ARGUMENT" && /image|photo|truncated/i.test(err.message || "")) {
      head = t("error.notimage");
    }
    return head + (err.message ? " — " + err.message : "");
  }

  function showError(err) {
    const box = $("error");
    box.textContent = errorText(err);
    box.hidden = false;
  }

  function clearError() { $("error").hidden = true; $("error").textContent = ""; }

  function notify(text) { $("notice").textContent = text; }

  function percent(x) {
    const value = Math.max(0, Math.min(1, Number(x) || 0)) * 100;
    return (value >= 10 || value === 0 ? value.toFixed(0) : value.toFixed(1)) + " %";
  }

  function vernacular(taxonomy) {
    const names = (taxonomy && taxonomy.vernacularNames) || [];
    const order = state.lang === "fr" ? ["fr", "en"] : ["en", "fr"];
    const out = [];
    for (const lang of order) {
      const name = names.find((v) => v.language === lang);
      if (name) out.push(h("span", { lang, text: name.name }));
    }
    return out.flatMap((node, i) => (i ? [" · ", node] : [node]));
  }

  function speciesLink(name) {
    return h("a", { href: "#/species/" + encodeURIComponent(name), class: "sci", text: name });
  }

  function lineageList(taxonomy, list) {
    list.replaceChildren(...((taxonomy && taxonomy.lineage) || []).map((taxon) =>
      h("li", {}, h("span", { class: "rank", text: t("rank." + taxon.rank) }), " ",
        h("span", { class: "sci", text: taxon.name }))));
    return list;
  }

  function canCurate() { return state.openServer || Boolean(state.key); }

  // ------------------------------------------------------------ language

  function applyLanguage() {
    document.documentElement.lang = state.lang;
    for (const node of document.querySelectorAll("[data-i18n]")) {
      node.textContent = t(node.dataset.i18n);
    }
    const other = state.lang === "fr" ? "en" : "fr";
    const button = $("lang");
    button.textContent = t("lang.switch");
    button.setAttribute("lang", other);
    button.setAttribute("aria-label", t("lang.label"));
    $("key-button").textContent = state.key ? t("key.button.set") : t("key.button");
    document.title = t("title");
    renderFooter();
    for (const card of document.querySelectorAll(".result")) {
      if (card._render) card._render();
    }
    if (!$("view-species").hidden) renderSpeciesView();
  }

  // ------------------------------------------------------------ service info

  async function loadInfo() {
    try {
      state.info = await api("GET", "/v1/info");
      state.openServer = !state.key;
      await loadSpecies();
    } catch (err) {
      if (err.code === "UNAUTHENTICATED") notify(t("key.needed"));
      else showError(err);
    }
    renderFooter();
    applyCurationVisibility();
  }

  async function loadSpecies() {
    const data = await api("GET", "/v1/species");
    state.species = data.species || [];
    const list = $("species-list");
    list.replaceChildren(...state.species.map((s) => {
      const names = vernacular(s.taxonomy).map((n) => n.textContent || "").filter(Boolean);
      return h("option", { value: s.scientificName, label: names.join(" · ") || null });
    }));
  }

  function renderFooter() {
    const info = state.info;
    $("footer-model").textContent = info ? t("footer.model", {
      model: info.modelId, mode: info.mode, species: info.catalogSize,
      gallery: info.gallerySize,
    }) : "";
  }

  function applyCurationVisibility() {
    document.body.classList.toggle("can-curate", canCurate());
  }

  // ------------------------------------------------------------ identify

  function identifyFiles(files) {
    clearError();
    for (const file of Array.from(files || [])) identifyOne(file);
  }

  // Photos are sent as the CLI sends them (tools/upload.py): upright JPEG, short side
  // UPLOAD_SHORT_SIDE px, quality 0.9; small photos and unreadable files go as they are.
  const UPLOAD_SHORT_SIDE = 448;

  async function downsizeForUpload(file) {
    let bitmap;
    try {
      bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
    } catch (err) {
      return file;  // not an image the browser reads: the server says why
    }
    const scale = UPLOAD_SHORT_SIDE / Math.min(bitmap.width, bitmap.height);
    if (scale >= 1) { bitmap.close(); return file; }
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(bitmap.width * scale));
    canvas.height = Math.max(1, Math.round(bitmap.height * scale));
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    bitmap.close();
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.9));
    return blob || file;
  }

  async function identifyOne(file) {
    const card = h("article", { class: "result", "data-state": "pending", "aria-busy": "true" });
    const url = URL.createObjectURL(file);
    card._file = file;
    card._url = url;
    card._render = () => renderResult(card);
    $("results").prepend(card);
    renderResult(card);
    card._upload = await downsizeForUpload(file);
    const form = new FormData();
    form.append("image", card._upload, file.name || "photo");
    form.append("topK", String(TOP_K));
    form.append("numSimilar", String(NUM_SIMILAR));
    form.append("includeThumbnails", "true");
    try {
      card._response = await api("POST", "/v1/identify", form);
      card.dataset.state = "done";
    } catch (err) {
      card._error = err;
      card.dataset.state = "error";
    }
    card.removeAttribute("aria-busy");
    renderResult(card);
  }

  function renderResult(card) {
    const photo = h("img", { class: "query", src: card._url, alt: card._file.name || "photo" });
    const body = h("div", { class: "answer" });
    if (card.dataset.state === "pending") {
      body.append(h("p", { class: "pending", text: t("result.pending") }));
    } else if (card.dataset.state === "error") {
      body.append(h("h3", { class: "failed", text: t("result.error") }),
                  h("p", { class: "error-text", role: "alert", text: errorText(card._error) }),
                  h("p", { class: "muted", text: t("result.file", { value: card._file.name }) }));
    } else {
      body.append(...decisionNodes(card._response));
    }
    const parts = [h("div", { class: "result-head" }, photo, body)];
    if (card.dataset.state === "done") {
      parts.push(similarSection(card._response.similar || []));
      parts.push(addToSpeciesForm(card));
    }
    card.replaceChildren(...parts);
  }

  function decisionNodes(response) {
    const d = response.decision || {};
    const nodes = [];
    const rejected = d.method === "METHOD_REJECTED" || (!d.species && !d.taxon);
    if (rejected) {
      nodes.push(h("p", { class: "decision-label", text: t("method.METHOD_REJECTED") }),
                 h("h3", { class: "decision dontknow", text: t("result.dontknow") }),
                 h("p", { class: "muted", text: t("result.dontknow.help") }));
    } else {
      const label = d.species ? t("result.species") : t("rank." + d.rank);
      nodes.push(h("p", { class: "decision-label", text: label }),
                 h("h3", { class: "decision" }, speciesOrTaxon(d)),
                 h("p", { class: "names" }, vernacular(response.taxonomy)));
    }
    const zeroShot = state.info && state.info.mode === "zero-shot";
    nodes.push(h("p", { class: "confidence" },
      h("span", { text: t("result.confidence", { value: percent(d.confidence) }) }), " ",
      h("meter", { min: "0", max: "1", value: String(d.confidence || 0),
                   "aria-label": t("result.confidence", { value: percent(d.confidence) }) }),
      h("br"), h("small", { class: "muted",
        text: (zeroShot ? t("result.confidence.zeroshot") : t("result.confidence.hybrid")) +
              " · " + t("result.method", { value: t("method." + d.method) }) })));
    if (!rejected) {
      nodes.push(h("h4", { text: t("result.lineage") }),
                 lineageList(response.taxonomy, h("ol", { class: "lineage" })));
    }
    const ranks = response.rankConfidences || [];
    if (ranks.length) {
      nodes.push(h("details", { class: "ranks" },
        h("summary", { text: t("result.ranks") }),
        h("ul", {}, ranks.map((r) => h("li", {},
          t("rank." + r.rank) + " ", h("span", { class: "sci", text: r.taxon }),
          " — " + percent(r.confidence))))));
    }
    nodes.push(candidatesBlock(response));
    return nodes;
  }

  function speciesOrTaxon(d) {
    return d.species ? speciesLink(d.species) : h("span", { class: "sci", text: d.taxon });
  }

  function candidatesBlock(response) {
    const groups = [
      ["result.candidates.classifier", response.classifierCandidates || []],
      ["result.candidates.prototype", response.prototypeCandidates || []],
    ].filter(([, list]) => list.length);
    return h("details", { class: "candidates", open: true },
      h("summary", { text: t("result.candidates") }),
      groups.map(([key, list]) => h("div", { class: "candidate-group" },
        h("h5", { text: t(key) }),
        h("ol", {}, list.map((c) => h("li", {},
          speciesLink(c.species), " ",
          h("meter", { min: "0", max: "1", value: String(c.score || 0),
                       "aria-hidden": "true" }),
          " " + percent(c.score)))))));
  }

  // ------------------------------------------------------------ photos

  function thumbItem(item, onRemoved) {
    const id = String(item.exemplarId);
    const image = item.thumbnail
      ? h("img", { src: "data:image/jpeg;base64," + item.thumbnail, loading: "lazy",
                   alt: t("similar.alt", { species: item.species, id }) })
      : h("div", { class: "nothumb", role: "img",
                   "aria-label": t("similar.alt", { species: item.species, id }),
                   text: t("similar.nothumb") });
    const meta = [];
    if (item.score !== undefined && item.score !== null && "score" in item) {
      meta.push(t("similar.score", { value: Number(item.score).toFixed(2) }));
    }
    if (item.license) meta.push(t("similar.licence", { value: item.license }));
    if (item.contributor) meta.push(t("similar.by", { value: item.contributor }));
    const source = /^https?:\/\//i.test(item.sourceUri || "")
      ? h("a", { href: item.sourceUri, rel: "noopener noreferrer", target: "_blank",
                 text: t("similar.source") })
      : null;
    const li = h("li", { class: "thumb", "data-exemplar-id": id },
      h("figure", {}, image,
        h("figcaption", {}, speciesLink(item.species), h("br"),
          h("small", { text: meta.join(" · ") }), source ? [" · ", source] : null)));
    if (canCurate()) li.append(removeButton(id, li, onRemoved));
    return li;
  }

  function removeButton(id, li, onRemoved) {
    const button = h("button", { type: "button", class: "remove curator-only",
                                 text: t("curate.remove") });
    button.addEventListener("click", async () => {
      if (button.dataset.armed !== "1") {  // two steps: no accidental removal
        button.dataset.armed = "1";
        button.textContent = t("curate.remove.confirm");
        return;
      }
      button.disabled = true;
      try {
        await api("DELETE", "/v1/exemplars/" + encodeURIComponent(id));
        clearError();
        notify(t("curate.remove.done", { id }));
        li.remove();
        if (onRemoved) onRemoved();
        refreshInfo();
      } catch (err) {
        showError(err);
        button.disabled = false;
      }
    });
    return button;
  }

  function similarSection(similar) {
    return h("section", { class: "similar" },
      h("h4", { text: t("result.similar") }),
      similar.length
        ? h("ul", { class: "thumbs" }, similar.map((s) => thumbItem(s)))
        : h("p", { class: "muted", text: t("result.similar.none") }));
  }

  function addToSpeciesForm(card) {
    const n = Math.random().toString(36).slice(2, 8);
    const decided = (card._response.decision || {}).species || "";
    const speciesInput = h("input", { id: "sp-" + n, name: "species", list: "species-list",
                                      required: true, autocomplete: "off", value: decided });
    const licence = h("input", { id: "li-" + n, name: "license", autocomplete: "off",
                                 value: sessionStorage.getItem("biolit-licence") || "" });
    const contributor = h("input", { id: "co-" + n, name: "contributor", autocomplete: "off",
                                     value: sessionStorage.getItem("biolit-contributor") || "" });
    const submit = h("button", { type: "submit", class: "primary", text: t("curate.add.submit") });
    const form = h("form", { class: "add-exemplar curator-only" },
      h("fieldset", {},
        h("legend", { text: t("curate.add.legend") }),
        h("label", { for: "sp-" + n, text: t("curate.add.species") }), speciesInput,
        h("label", { for: "li-" + n, text: t("curate.add.licence") }), licence,
        h("label", { for: "co-" + n, text: t("curate.add.contributor") }), contributor,
        submit));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      submit.disabled = true;
      const body = new FormData();
      body.append("species", speciesInput.value.trim());
      body.append("image", card._upload || card._file, card._file.name || "photo");
      if (licence.value.trim()) body.append("license", licence.value.trim());
      if (contributor.value.trim()) body.append("contributor", contributor.value.trim());
      sessionStorage.setItem("biolit-licence", licence.value.trim());
      sessionStorage.setItem("biolit-contributor", contributor.value.trim());
      try {
        const out = await api("POST", "/v1/exemplars", body);
        const id = (out.exemplarIds || [])[0];
        const species = speciesInput.value.trim();
        const created = (out.speciesUpdated || []).length > 0;
        clearError();
        notify(t(created ? "curate.add.done" : "curate.add.same", { species, id }));
        form.append(h("p", { class: "done", "data-exemplar-id": String(id),
          text: t(created ? "curate.add.done" : "curate.add.same", { species, id }) }));
        refreshInfo();
      } catch (err) {
        showError(err);
      } finally {
        submit.disabled = false;
      }
    });
    return form;
  }

  async function refreshInfo() {
    try {
      state.info = await api("GET", "/v1/info");
      renderFooter();
    } catch (_) { /* the footer is informative only */ }
  }

  // ------------------------------------------------------------ species page

  async function showSpecies(name) {
    const page = state.speciesPage;
    if (page.name !== name) Object.assign(page, { name, tokens: [""], index: 0 });
    await renderSpeciesView();
  }

  async function renderSpeciesView() {
    const page = state.speciesPage;
    const name = page.name;
    if (!name) return;
    try {
      const species = await api("GET", "/v1/species/" + encodeURIComponent(name));
      $("species-name").textContent = species.scientificName;
      $("species-names").replaceChildren(...vernacular(species.taxonomy));
      lineageList(species.taxonomy, $("species-lineage"));
      $("species-flags").textContent = t("species.flags", {
        classifier: t(species.inClassifier ? "yes" : "no"),
        visual: t(species.hasVisualPrototype ? "yes" : "no"),
        runtime: t(species.addedAtRuntime ? "yes" : "no"),
      });
      $("species-description").textContent = species.description || "";
      const query = new URLSearchParams({ species: name, pageSize: String(PAGE_SIZE),
                                          includeThumbnails: "true" });
      const token = page.tokens[page.index];
      if (token) query.set("pageToken", token);
      const list = await api("GET", "/v1/exemplars?" + query.toString());
      const total = Number(list.totalCount || 0);
      $("species-photos-heading").textContent = t("species.photos", { count: total });
      const items = (list.exemplars || []).map((e) => thumbItem(e, () => renderSpeciesView()));
      $("species-photos").replaceChildren(...(items.length ? items :
        [h("li", { class: "muted", text: t("species.photos.none") })]));
      if (list.nextPageToken) page.tokens[page.index + 1] = list.nextPageToken;
      else page.tokens.length = page.index + 1;
      $("species-prev").disabled = page.index === 0;
      $("species-next").disabled = !list.nextPageToken;
      $("species-page").textContent = t("species.page", { value: page.index + 1 });
    } catch (err) {
      showError(err);
    }
  }

  // ------------------------------------------------------------ curation

  async function addSpecies(event) {
    event.preventDefault();
    const form = event.target;
    const name = form.scientificName.value.trim();
    const vernacularNames = [];
    if (form.fr.value.trim()) vernacularNames.push({ name: form.fr.value.trim(), language: "fr" });
    if (form.en.value.trim()) vernacularNames.push({ name: form.en.value.trim(), language: "en" });
    try {
      const species = await api("POST", "/v1/species", {
        scientificName: name, vernacularNames, description: form.description.value.trim(),
      });
      clearError();
      notify(t("curate.species.done", { species: species.scientificName }));
      form.reset();
      await loadSpecies();
      refreshInfo();
    } catch (err) {
      showError(err);
    }
  }

  function openKeyDialog() {
    const dialog = $("key-dialog");
    $("key-input").value = state.key;
    dialog.showModal();
    $("key-input").focus();
  }

  function closeKeyDialog() {
    const action = $("key-dialog").returnValue;
    if (action === "save") state.key = $("key-input").value.trim();
    if (action === "forget") state.key = "";
    $("key-input").value = "";
    if (action === "save" || action === "forget") {
      if (state.key) sessionStorage.setItem("biolit-key", state.key);
      else sessionStorage.removeItem("biolit-key");
      clearError();
      notify("");
      applyLanguage();
      loadInfo();
    }
    $("key-button").focus();
  }

  // ------------------------------------------------------------ routing

  function route() {
    const hash = location.hash || "#/";
    const views = { identify: $("view-identify"), species: $("view-species"),
                    curate: $("view-curate") };
    let current = "identify";
    if (hash.startsWith("#/species/")) {
      current = "species";
      showSpecies(decodeURIComponent(hash.slice("#/species/".length)));
    } else if (hash === "#/curate") {
      current = "curate";
    }
    for (const [name, view] of Object.entries(views)) view.hidden = name !== current;
    for (const link of document.querySelectorAll("nav a")) {
      const active = link.getAttribute("href") === hash ||
        (current === "identify" && link.getAttribute("href") === "#/");
      if (active) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
  }

  // ------------------------------------------------------------ wiring

  function wire() {
    $("pick").addEventListener("change", (e) => { identifyFiles(e.target.files); e.target.value = ""; });
    $("camera").addEventListener("change", (e) => { identifyFiles(e.target.files); e.target.value = ""; });
    const drop = $("drop");
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      identifyFiles(e.dataTransfer && e.dataTransfer.files);
    });
    $("lang").addEventListener("click", () => {
      state.lang = state.lang === "fr" ? "en" : "fr";
      localStorage.setItem("biolit-lang", state.lang);
      applyLanguage();
    });
    $("key-button").addEventListener("click", openKeyDialog);
    $("key-dialog").addEventListener("close", closeKeyDialog);
    $("add-species").addEventListener("submit", addSpecies);
    $("species-prev").addEventListener("click", () => {
      state.speciesPage.index = Math.max(0, state.speciesPage.index - 1);
      renderSpeciesView();
    });
    $("species-next").addEventListener("click", () => {
      state.speciesPage.index += 1;
      renderSpeciesView();
    });
    window.addEventListener("hashchange", route);
  }

  window.BIOLIT_UPLOAD = { downsizeForUpload, UPLOAD_SHORT_SIDE };  // what the page sends
  wire();
  applyLanguage();
  route();
  loadInfo().then(() => document.body.setAttribute("data-ready", "1"));
})();
