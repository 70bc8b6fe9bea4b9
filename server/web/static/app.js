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
    deviceChosen: localStorage.getItem("biolit-device") === "1",  // identify on this device
    devicePrecision: localStorage.getItem("biolit-device-precision") || "fp32",
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

  // A "find" is what a volunteer records: one or more photos of one organism, where and
  // when. Several photos chosen together are one observation (/v1/identify-observation);
  // "Split" turns them into one find per photo (/v1/identify). The place and date are
  // read from each photo's EXIF before downsizing (the canvas drops EXIF).

  function maxObservationPhotos() {
    const limits = (state.info && state.info.limits) || {};
    return Number(limits.maxObservationPhotos) || 8;
  }

  function identifyFiles(files) {
    clearError();
    const list = Array.from(files || []);
    const cap = maxObservationPhotos();
    if (list.length > cap) notify(t("find.toomany", { count: list.length, max: cap }));
    const finds = [];
    for (let i = 0; i < list.length; i += cap) finds.push(list.slice(i, i + cap));
    for (const group of finds.reverse()) {
      startFind(group.map((file) => ({ file, url: URL.createObjectURL(file), crop: null })));
    }
  }

  // ---- EXIF

  function exifDate(tags) {
    const exif = (tags && tags.exif) || {};
    for (const name of ["DateTimeOriginal", "DateTimeDigitized", "DateTime"]) {
      const tag = exif[name];
      const text = tag && String(tag.description || (tag.value && tag.value[0]) || "");
      const m = /^(\d{4})[:-](\d{2})[:-](\d{2})/.exec(text || "");
      if (m && m[1] !== "0000") return `${m[1]}-${m[2]}-${m[3]}`;
    }
    return "";
  }

  // {place: {latitude, longitude} | null, date: "YYYY-MM-DD" | ""} from the original file.
  async function readExif(file) {
    const out = { place: null, date: "" };
    if (!window.ExifReader || !file) return out;
    try {
      const tags = await window.ExifReader.load(await file.arrayBuffer(), { expanded: true });
      const gps = tags.gps || {};
      const lat = Number(gps.Latitude), lon = Number(gps.Longitude);
      if (Number.isFinite(lat) && Number.isFinite(lon) && Math.abs(lat) <= 90 &&
          Math.abs(lon) <= 180 && !(lat === 0 && lon === 0)) {
        out.place = { latitude: round6(lat), longitude: round6(lon) };
      }
      const date = exifDate(tags);
      if (date && date <= today()) out.date = date;  // a camera clock in the future: ignored
    } catch (_) { /* no EXIF, or not a format ExifReader reads */ }
    return out;
  }

  function round6(x) { return Math.round(x * 1e6) / 1e6; }

  function today() {
    const d = new Date();
    return `${d.getFullYear()}-${String(d.getMonth() + 1).padStart(2, "0")}-` +
           String(d.getDate()).padStart(2, "0");
  }

  function distanceKm(a, b) {
    const rad = Math.PI / 180;
    const dlat = (b.latitude - a.latitude) * rad, dlon = (b.longitude - a.longitude) * rad;
    const s = Math.sin(dlat / 2) ** 2 +
      Math.cos(a.latitude * rad) * Math.cos(b.latitude * rad) * Math.sin(dlon / 2) ** 2;
    return 12742 * Math.asin(Math.min(1, Math.sqrt(s)));
  }

  // The find's place and date: the first photo that has one (the volunteer may correct them).
  function adoptExif(find, inherited) {
    const withPlace = find.photos.findIndex((p) => p.exif && p.exif.place);
    if (withPlace >= 0) {
      find.place = { ...find.photos[withPlace].exif.place, uncertaintyM: 0, source: "exif",
                     photo: withPlace };
      find.spreadKm = Math.max(0, ...find.photos.filter((p) => p.exif && p.exif.place)
        .map((p) => distanceKm(find.place, p.exif.place)));
    } else if (inherited && inherited.place) {
      find.place = { ...inherited.place, source: "inherited" };
    }
    const withDate = find.photos.findIndex((p) => p.exif && p.exif.date);
    if (withDate >= 0) find.date = { value: find.photos[withDate].exif.date, source: "exif",
                                     photo: withDate };
    else if (inherited && inherited.date) find.date = { ...inherited.date, source: "inherited" };
  }

  // ---- what is sent

  // Photos are sent as the CLI sends them (tools/upload.py): upright JPEG, short side
  // UPLOAD_SHORT_SIDE px, quality 0.9; small photos and unreadable files go as they are.
  // A crop ({x, y, w, h}, fractions of the upright photo) is cut out first, then downsized.
  const UPLOAD_SHORT_SIDE = 448;

  function isCrop(crop) {
    return Boolean(crop) && (crop.x > 0.001 || crop.y > 0.001 || crop.w < 0.999 ||
                             crop.h < 0.999);
  }

  async function downsizeForUpload(file, crop) {
    let bitmap;
    try {
      bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
    } catch (err) {
      return file;  // not an image the browser reads: the server says why
    }
    const cropped = isCrop(crop);
    const sx = cropped ? Math.round(crop.x * bitmap.width) : 0;
    const sy = cropped ? Math.round(crop.y * bitmap.height) : 0;
    const sw = cropped ? Math.max(1, Math.min(bitmap.width - sx, Math.round(crop.w * bitmap.width)))
      : bitmap.width;
    const sh = cropped ? Math.max(1, Math.min(bitmap.height - sy,
                                              Math.round(crop.h * bitmap.height)))
      : bitmap.height;
    const scale = Math.min(1, UPLOAD_SHORT_SIDE / Math.min(sw, sh));
    if (scale >= 1 && !cropped) { bitmap.close(); return file; }
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(sw * scale));
    canvas.height = Math.max(1, Math.round(sh * scale));
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(bitmap, sx, sy, sw, sh, 0, 0, canvas.width, canvas.height);
    bitmap.close();
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.9));
    return blob || file;
  }

  function base64Of(blob) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(blob);
    });
  }

  // ---- a find's card

  function newCard(photos, inherited) {
    const find = { photos, place: null, date: null, geo: "", spreadKm: 0, token: 0 };
    const card = h("article", { class: "result find", "data-state": "pending",
                                "aria-busy": "true",
                                "data-mode": photos.length > 1 ? "observation" : "single" });
    card._find = find;
    card._file = photos[0].file;
    card._url = photos[0].url;
    card._inherited = inherited || null;
    card._render = () => renderCard(card, true);
    card._answer = h("div", { class: "answer" });
    card._strip = h("div", { class: "photos" });
    card._context = contextForm(card);
    card._extras = h("div", { class: "extras" });
    card._tools = h("div", { class: "find-tools" });
    card.append(h("div", { class: "result-head" },
                  h("div", { class: "find-side" }, card._strip, card._tools), card._answer),
                card._context, card._extras);
    return card;
  }

  async function startFind(photos, inherited, before) {
    const card = newCard(photos, inherited);
    if (before) before.before(card); else $("results").prepend(card);
    renderCard(card);
    await Promise.all(photos.map(async (p) => {
      if (p.exif === undefined) p.exif = await readExif(p.file);
    }));
    adoptExif(card._find, inherited);
    fillContext(card);
    await identifyFind(card);
    return card;
  }

  function splitFind(card) {
    const find = card._find;
    const inherited = { place: find.place, date: find.date };
    const count = find.photos.length;
    find.token += 1;  // an answer still on its way is dropped
    for (const photo of find.photos) startFind([photo], inherited, card);
    card.remove();
    notify(t("find.split.done", { count }));
  }

  async function identifyFind(card) {
    const find = card._find;
    const context = readContext(card);
    if (!context) return;  // the fields say what is wrong
    const token = ++find.token;
    card.dataset.state = "pending";
    card.setAttribute("aria-busy", "true");
    renderCard(card);
    let response = null, error = null;
    card._device = false;
    try {
      for (const photo of find.photos) {
        photo.upload = await downsizeForUpload(photo.file, photo.crop);
      }
      if (onDevice()) response = await identifyOnDevice(card, context);
      else response = await send(find, context);
    } catch (err) {
      error = err instanceof ApiError ? err : new ApiError("UNKNOWN", String(err), 0);
      if (error.status === 0 && device()) {  // the network is down: the device answers
        try { response = await identifyOnDevice(card, context); error = null; } catch (_) { /* */ }
      }
    }
    if (token !== find.token) return;  // a newer identification of this find is under way
    card._upload = find.photos[0].upload;
    card._response = response;
    card._error = error;
    card._sent = context;
    card.dataset.state = error ? "error" : "done";
    card.removeAttribute("aria-busy");
    renderCard(card);
    if (card._confirm) {
      const record = card._confirm;
      card._confirm = null;
      confirmOnServer(card, record);
    }
  }

  // ---- on the device (device.js): chosen, or by default when the network is down

  function device() { return window.BIOLIT_DEVICE || null; }

  function onDevice() {
    return Boolean(device()) && (state.deviceChosen || !navigator.onLine);
  }

  // The answer made here at once; the server's (with similar photos) follows from the
  // embedding, now when the network is up, else when it returns (queued in IndexedDB).
  async function identifyOnDevice(card, context) {
    const find = card._find;
    const photos = find.photos;
    const answers = [];
    for (const photo of photos) answers.push(await device().identify(photo.upload, deviceOptions()));
    const response = answers[0];
    card._device = true;
    card._embeddings = answers.map((a) => a.embedding);
    const record = { embeddings: card._embeddings, name: photos[0].file.name || "photo",
                     place: context.place, date: context.date, at: new Date().toISOString() };
    card._confirm = record;  // sent once the card shows the device's answer
    return response;
  }

  function deviceOptions() { return { key: state.key, precision: state.devicePrecision }; }

  function embeddingBody(record) {
    const body = { embedding: Array.from(record.embeddings[0]), topK: TOP_K,
                   numSimilar: NUM_SIMILAR, includeThumbnails: true };
    if (record.place) {
      body.location = { latitude: record.place.latitude, longitude: record.place.longitude,
                        uncertaintyM: record.place.uncertaintyM || 0 };
    }
    if (record.date) body.observedOn = record.date;
    return body;
  }

  async function confirmOnServer(card, record) {
    const token = card._find.token;
    try {
      const response = await api("POST", "/v1/identify", embeddingBody(record));
      if (token !== card._find.token) return;
      card._response = response;
      card._device = false;
      card.dataset.source = "server";
      renderCard(card);
    } catch (err) {
      if (err.status !== 0) return;  // the server refused: the device's answer stays
      const id = await device().queue.add(record).catch(() => null);
      card._queued = id;
      card.dataset.queued = "true";
      renderCard(card);
      notify(t("device.queued"));
    }
  }

  // The network is back: what was identified without it goes to the server, as embeddings.
  async function sendQueued() {
    if (!device() || !navigator.onLine) return;
    const records = await device().queue.all().catch(() => []);
    for (const record of records) {
      let response;
      try { response = await api("POST", "/v1/identify", embeddingBody(record)); } catch (err) {
        if (err.status === 0) return;  // still offline: try again at the next "online"
      }
      await device().queue.remove(record.id);
      const card = Array.from(document.querySelectorAll(".result"))
        .find((c) => c._queued === record.id);
      if (card && response) {
        card._response = response;
        card._device = false;
        card._queued = null;
        card.dataset.source = "server";
        delete card.dataset.queued;
        renderCard(card);
      }
    }
    if (records.length) notify(t("device.sent", { count: records.length }));
  }

  async function send(find, context) {
    const photos = find.photos;
    if (photos.length > 1) {
      const form = new FormData();
      photos.forEach((p, i) => form.append("image", p.upload, p.file.name || `photo-${i + 1}`));
      if (context.place) {
        form.append("latitude", String(context.place.latitude));
        form.append("longitude", String(context.place.longitude));
        if (context.place.uncertaintyM > 0) {
          form.append("uncertainty_m", String(context.place.uncertaintyM));
        }
      }
      if (context.date) form.append("observedOn", context.date);
      form.append("topK", String(TOP_K));
      form.append("numSimilar", String(NUM_SIMILAR));
      form.append("includeThumbnails", "true");
      return api("POST", "/v1/identify-observation", form);
    }
    const photo = photos[0];
    if (!context.place && !context.date) {  // as before: a form with the photo
      const form = new FormData();
      form.append("image", photo.upload, photo.file.name || "photo");
      form.append("topK", String(TOP_K));
      form.append("numSimilar", String(NUM_SIMILAR));
      form.append("includeThumbnails", "true");
      return api("POST", "/v1/identify", form);
    }
    // A form cannot carry the nested location: JSON, the photo in base64.
    const body = { image: await base64Of(photo.upload), topK: TOP_K, numSimilar: NUM_SIMILAR,
                   includeThumbnails: true };
    if (context.place) {
      body.location = { latitude: context.place.latitude, longitude: context.place.longitude,
                        uncertaintyM: context.place.uncertaintyM || 0 };
    }
    if (context.date) body.observedOn = context.date;
    return api("POST", "/v1/identify", body);
  }

  // ---- where and when

  function contextForm(card) {
    const n = Math.random().toString(36).slice(2, 8);
    const lat = h("input", { id: "lat-" + n, name: "latitude", type: "text", inputmode: "decimal",
                             autocomplete: "off", spellcheck: "false" });
    const lon = h("input", { id: "lon-" + n, name: "longitude", type: "text",
                             inputmode: "decimal", autocomplete: "off", spellcheck: "false" });
    const date = h("input", { id: "date-" + n, name: "observedOn", type: "date", max: today() });
    const parts = {
      legend: h("legend"), latLabel: h("label", { for: lat.id }),
      lonLabel: h("label", { for: lon.id }), dateLabel: h("label", { for: date.id }),
      placeSource: h("p", { class: "place-source muted" }),
      dateSource: h("p", { class: "date-source muted" }),
      geoStatus: h("p", { class: "geo-status", role: "status", "aria-live": "polite" }),
      geo: h("button", { type: "button", class: "use-position" }),
      again: h("button", { type: "submit", class: "identify-again primary" }),
      lat, lon, date,
    };
    parts.geo.addEventListener("click", () => useDevicePosition(card));
    for (const input of [lat, lon, date]) {
      input.addEventListener("input", () => input.removeAttribute("aria-invalid"));
    }
    const form = h("form", { class: "context", novalidate: true },
      h("fieldset", {}, parts.legend,
        h("div", { class: "place-fields" },
          h("div", {}, parts.latLabel, lat), h("div", {}, parts.lonLabel, lon),
          h("div", {}, parts.dateLabel, date)),
        parts.placeSource, parts.dateSource, parts.geoStatus,
        h("div", { class: "row" }, parts.geo, parts.again)));
    form.addEventListener("submit", (event) => { event.preventDefault(); identifyFind(card); });
    form._parts = parts;
    return form;
  }

  function fillContext(card) {
    const { lat, lon, date } = card._context._parts;
    const find = card._find;
    lat.value = find.place ? String(find.place.latitude) : "";
    lon.value = find.place ? String(find.place.longitude) : "";
    date.value = find.date ? find.date.value : "";
    labelContext(card);
  }

  function labelContext(card) {
    const p = card._context._parts;
    const find = card._find;
    p.legend.textContent = t("context.legend");
    p.latLabel.textContent = t("context.latitude");
    p.lonLabel.textContent = t("context.longitude");
    p.dateLabel.textContent = t("context.date");
    p.geo.textContent = t("context.geo");
    p.again.textContent = t("context.again");
    const place = find.place;
    let placeText;
    if (!place) placeText = t("context.place.none");
    else if (place.source === "exif") {
      placeText = t(find.photos.length > 1 ? "context.place.exif.n" : "context.place.exif",
                    { n: place.photo + 1 });
      if (find.spreadKm > 1) placeText += " " + t("context.place.spread",
                                                  { km: find.spreadKm.toFixed(1) });
    } else if (place.source === "device") {
      placeText = t("context.place.device", { m: Math.round(place.uncertaintyM || 0) });
    } else placeText = t("context.place." + (place.source === "inherited" ? "inherited" : "typed"));
    p.placeSource.textContent = placeText;
    const d = find.date;
    p.dateSource.textContent = !d ? t("context.date.none")
      : d.source === "exif" ? t(find.photos.length > 1 ? "context.date.exif.n"
                                                        : "context.date.exif", { n: d.photo + 1 })
        : t("context.date." + (d.source === "inherited" ? "inherited" : "typed"));
    p.geoStatus.textContent = find.geo ? t("context.geo." + find.geo) : "";
    p.geoStatus.className = "geo-status" + (find.geo === "refused" || find.geo === "failed"
      ? " warn" : "");
    p.geo.classList.toggle("primary", !place);
  }

  function parseCoordinate(text, limit) {
    const value = Number(String(text).trim().replace(",", "."));
    return Number.isFinite(value) && Math.abs(value) <= limit ? value : null;
  }

  // What the fields say, or null (and the bad fields marked) when they are wrong.
  function readContext(card) {
    const p = card._context._parts;
    const find = card._find;
    const latText = p.lat.value.trim(), lonText = p.lon.value.trim();
    let place = null, ok = true;
    if (latText || lonText) {
      const lat = parseCoordinate(latText, 90), lon = parseCoordinate(lonText, 180);
      if (lat === null) { p.lat.setAttribute("aria-invalid", "true"); ok = false; }
      if (lon === null) { p.lon.setAttribute("aria-invalid", "true"); ok = false; }
      if (ok) {
        const same = find.place && find.place.latitude === lat && find.place.longitude === lon;
        if (!same) find.place = { latitude: lat, longitude: lon, uncertaintyM: 0, source: "typed" };
        place = find.place;
      }
    } else find.place = null;
    let date = "";
    if (p.date.value) {
      if (p.date.value > today()) { p.date.setAttribute("aria-invalid", "true"); ok = false; }
      else {
        if (!find.date || find.date.value !== p.date.value) {
          find.date = { value: p.date.value, source: "typed" };
        }
        date = p.date.value;
      }
    } else find.date = null;
    labelContext(card);
    if (!ok) {
      p.geoStatus.textContent = t("context.invalid");
      p.geoStatus.className = "geo-status warn";
      return null;
    }
    return { place: place && { latitude: place.latitude, longitude: place.longitude,
                                uncertaintyM: place.uncertaintyM || 0 }, date };
  }

  // Only on the volunteer's tap; the browser asks for consent first.
  function useDevicePosition(card) {
    const find = card._find;
    if (!navigator.geolocation) { find.geo = "failed"; labelContext(card); return; }
    find.geo = "asking";
    labelContext(card);
    navigator.geolocation.getCurrentPosition((position) => {
      find.place = { latitude: round6(position.coords.latitude),
                     longitude: round6(position.coords.longitude),
                     uncertaintyM: Math.round(position.coords.accuracy || 0), source: "device" };
      find.geo = "ok";
      fillContext(card);
      identifyFind(card);
    }, (err) => {
      find.geo = err && err.code === 1 ? "refused" : "failed";
      labelContext(card);
    }, { enableHighAccuracy: true, timeout: 20000, maximumAge: 300000 });
  }

  // ---- crop

  const CROP_MIN = 0.1;

  function clampBox(box) {
    const w = Math.min(1, Math.max(CROP_MIN, box.w)), hh = Math.min(1, Math.max(CROP_MIN, box.h));
    return { x: Math.min(1 - w, Math.max(0, box.x)), y: Math.min(1 - hh, Math.max(0, box.y)),
             w, h: hh };
  }

  function cropText(box) {
    return t("crop.value", { w: Math.round(box.w * 100), h: Math.round(box.h * 100),
                             x: Math.round(box.x * 100), y: Math.round(box.y * 100) });
  }

  function photoFigure(card, photo, index) {
    const find = card._find;
    const many = find.photos.length > 1;
    const img = h("img", { class: "query", src: photo.url, draggable: "false",
                           alt: many ? t("photo.alt.n", { n: index + 1, name: photo.file.name || "" })
                                     : (photo.file.name || "photo") });
    const frame = h("div", { class: "crop-frame" }, img);
    const editing = photo.editing;
    const figure = h("figure", { class: "photo" + (editing ? " editing" : ""),
                                 "data-index": String(index) }, frame);
    const box = editing ? { ...photo.editing } : photo.crop;
    if (box) {
      const el = h("div", { class: "crop-box" + (editing ? " editing" : "") });
      placeBox(el, box);
      frame.append(el);
      if (editing) wireCropEditor(card, photo, frame, el);
    }
    const caption = h("figcaption");
    if (many) caption.append(h("span", { class: "photo-n", text: t("photo.n", { n: index + 1 }) }));
    if (editing) {
      const help = h("p", { class: "crop-help muted", id: "crop-help-" + Math.random().toString(36).slice(2, 8),
                            text: t("crop.help") });
      frame.querySelector(".crop-box").setAttribute("aria-describedby", help.id);
      caption.append(help,
        h("p", { class: "crop-readout", role: "status", "aria-live": "polite", text: cropText(box) }),
        h("div", { class: "row" },
          h("button", { type: "button", class: "crop-done primary", text: t("crop.done"),
                        onclick: () => closeCrop(card, photo, true) }),
          h("button", { type: "button", class: "crop-reset", text: t("crop.reset"),
                        onclick: () => { photo.editing = { x: 0, y: 0, w: 1, h: 1 };
                                         renderStrip(card, index); } }),
          h("button", { type: "button", class: "crop-cancel", text: t("crop.cancel"),
                        onclick: () => closeCrop(card, photo, false) })));
    } else {
      caption.append(h("button", { type: "button", class: "crop-open",
        text: photo.crop ? t("crop.change") : t("crop.open"),
        "aria-label": many ? t("crop.open.n", { n: index + 1 }) : null,
        onclick: () => { photo.editing = { ...(photo.crop || { x: 0.1, y: 0.1, w: 0.8, h: 0.8 }) };
                         renderStrip(card, index); } }));
      if (photo.crop) caption.append(" ", h("small", { class: "muted crop-note", text: t("crop.applied") }));
    }
    figure.append(caption);
    return figure;
  }

  function placeBox(el, box) {
    el.style.left = (box.x * 100) + "%";
    el.style.top = (box.y * 100) + "%";
    el.style.width = (box.w * 100) + "%";
    el.style.height = (box.h * 100) + "%";
    el.dataset.crop = [box.x, box.y, box.w, box.h].map((v) => v.toFixed(4)).join(",");
  }

  function renderStrip(card, focusIndex) {
    const find = card._find;
    card._strip.classList.toggle("many", find.photos.length > 1);
    card._strip.replaceChildren(...find.photos.map((p, i) => photoFigure(card, p, i)));
    markOutliers(card);
    if (focusIndex !== undefined) {
      const figure = card._strip.children[focusIndex];
      const target = figure && (figure.querySelector(".crop-box.editing") ||
                                figure.querySelector(".crop-open"));
      if (target) target.focus();
    }
  }

  function closeCrop(card, photo, apply) {
    const index = card._find.photos.indexOf(photo);
    const box = photo.editing;
    photo.editing = null;
    if (apply) photo.crop = isCrop(box) ? box : null;
    renderStrip(card, index);
    if (apply) identifyFind(card);
  }

  function wireCropEditor(card, photo, frame, el) {
    el.tabIndex = 0;
    el.setAttribute("role", "application");
    el.setAttribute("aria-roledescription", t("crop.role"));
    el.setAttribute("aria-label", t("crop.box"));
    for (const corner of ["nw", "ne", "sw", "se"]) {
      el.append(h("span", { class: "handle " + corner, "data-corner": corner, "aria-hidden": "true" }));
    }
    const update = (box) => {
      photo.editing = clampBox(box);
      placeBox(el, photo.editing);
      const readout = frame.parentNode && frame.parentNode.querySelector(".crop-readout");
      if (readout) readout.textContent = cropText(photo.editing);
    };
    // Keyboard: arrows move, Shift+arrows resize, +/- grow or shrink, Enter applies.
    el.addEventListener("keydown", (event) => {
      const b = { ...photo.editing };
      const step = event.altKey ? 0.005 : 0.02;
      const keys = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
      if (keys[event.key]) {
        const [dx, dy] = keys[event.key];
        if (event.shiftKey) { b.w += dx * step; b.h += dy * step; } else { b.x += dx * step; b.y += dy * step; }
        if (event.shiftKey) { b.w = Math.min(b.w, 1 - b.x); b.h = Math.min(b.h, 1 - b.y); }
      } else if (event.key === "+" || event.key === "=" || event.key === "-") {
        const f = event.key === "-" ? 0.95 : 1 / 0.95;
        const cx = b.x + b.w / 2, cy = b.y + b.h / 2;
        b.w = Math.min(1, b.w * f); b.h = Math.min(1, b.h * f);
        b.x = cx - b.w / 2; b.y = cy - b.h / 2;
      } else if (event.key === "Enter") {
        event.preventDefault(); closeCrop(card, photo, true); return;
      } else if (event.key === "Escape") {
        event.preventDefault(); closeCrop(card, photo, false); return;
      } else return;
      event.preventDefault();
      update(b);
    });
    // Pointer (mouse, pen, touch): drag the box, drag a corner, pinch with two fingers.
    const pointers = new Map();
    let gesture = null;
    const rel = (e) => {
      const r = frame.getBoundingClientRect();
      return { x: (e.clientX - r.left) / r.width, y: (e.clientY - r.top) / r.height };
    };
    const spread = () => {
      const [a, b] = [...pointers.values()];
      return { dx: Math.abs(a.x - b.x), dy: Math.abs(a.y - b.y),
               cx: (a.x + b.x) / 2, cy: (a.y + b.y) / 2 };
    };
    frame.addEventListener("pointerdown", (event) => {
      if (event.button !== undefined && event.button > 0) return;
      event.preventDefault();
      frame.setPointerCapture(event.pointerId);
      pointers.set(event.pointerId, rel(event));
      const box = { ...photo.editing };
      if (pointers.size === 2) {
        gesture = { kind: "pinch", box, start: spread() };
      } else if (pointers.size === 1) {
        const corner = event.target.dataset && event.target.dataset.corner;
        gesture = { kind: corner ? "corner" : "move", corner, box, start: rel(event) };
      }
      el.focus({ preventScroll: true });
    });
    frame.addEventListener("pointermove", (event) => {
      if (!pointers.has(event.pointerId) || !gesture) return;
      pointers.set(event.pointerId, rel(event));
      const p = rel(event);
      const b = { ...gesture.box };
      if (gesture.kind === "pinch" && pointers.size >= 2) {
        const now = spread(), start = gesture.start;
        const fx = Math.max(start.dx, start.dy) > 0.01
          ? Math.hypot(now.dx, now.dy) / Math.hypot(start.dx, start.dy) : 1;
        const cx = b.x + b.w / 2 + (now.cx - start.cx), cy = b.y + b.h / 2 + (now.cy - start.cy);
        b.w = Math.min(1, b.w * fx); b.h = Math.min(1, b.h * fx);
        b.x = cx - b.w / 2; b.y = cy - b.h / 2;
      } else if (gesture.kind === "move") {
        b.x += p.x - gesture.start.x; b.y += p.y - gesture.start.y;
      } else if (gesture.kind === "corner") {
        const right = b.x + b.w, bottom = b.y + b.h;
        const c = gesture.corner;
        const px = Math.min(1, Math.max(0, p.x)), py = Math.min(1, Math.max(0, p.y));
        if (c.includes("w")) { b.x = Math.min(px, right - CROP_MIN); b.w = right - b.x; }
        else b.w = Math.max(CROP_MIN, px - b.x);
        if (c.includes("n")) { b.y = Math.min(py, bottom - CROP_MIN); b.h = bottom - b.y; }
        else b.h = Math.max(CROP_MIN, py - b.y);
      } else return;
      update(b);
    });
    const end = (event) => {
      pointers.delete(event.pointerId);
      if (pointers.size === 1) {  // pinch over: go on moving with the remaining finger
        gesture = { kind: "move", box: { ...photo.editing }, start: [...pointers.values()][0] };
      } else if (!pointers.size) gesture = null;
    };
    frame.addEventListener("pointerup", end);
    frame.addEventListener("pointercancel", end);
  }

  // ---- rendering

  // relabel: the photos too (language switch); otherwise they are drawn once, so that
  // an answer arriving while the volunteer crops does not disturb the crop box.
  function renderCard(card, relabel) {
    if (relabel || !card._strip.childElementCount) renderStrip(card);
    labelContext(card);
    renderAnswer(card);
    renderExtras(card);
    renderTools(card);
  }

  function renderTools(card) {
    const find = card._find;
    card.dataset.mode = find.photos.length > 1 ? "observation" : "single";
    if (find.photos.length < 2) { card._tools.replaceChildren(); return; }
    card._tools.replaceChildren(
      h("p", { class: "muted", text: t("find.split.help") }),
      h("button", { type: "button", class: "split", text: t("find.split", { count: find.photos.length }),
                    onclick: () => splitFind(card) }));
  }

  function renderAnswer(card) {
    const find = card._find;
    const body = card._answer;
    const many = find.photos.length > 1;
    const head = many ? [h("p", { class: "find-kind", text: t("find.observation",
                                                             { count: find.photos.length }) })] : [];
    if (card.dataset.state === "pending") {
      body.replaceChildren(...head, h("p", { class: "pending", text: t("result.pending") }));
    } else if (card.dataset.state === "error") {
      body.replaceChildren(...head,
        h("h3", { class: "failed", text: t("result.error") }),
        h("p", { class: "error-text", role: "alert", text: errorText(card._error) }),
        h("p", { class: "muted", text: t("result.file", {
          value: find.photos.map((p) => p.file.name).join(", ") }) }));
    } else {
      body.replaceChildren(...head, ...decisionNodes(card._response, find));
      if (card._device) {
        card.dataset.source = "device";
        body.prepend(h("p", { class: "device-badge", text: t(card._queued ? "device.badge.queued"
                                                              : "device.badge") }));
      }
    }
  }

  function renderExtras(card) {
    const parts = [];
    if (card.dataset.state === "done") {
      const response = card._response;
      const find = card._find;
      if (find.photos.length > 1) {
        parts.push(contributionsBlock(response, find));
        const photos = response.photos || [];
        const kept = (((response.evidence || {}).photos) || []).findIndex((e) => !e.excluded);
        parts.push(similarSection((photos[Math.max(0, kept)] || {}).similar || []));
      } else {
        parts.push(similarSection(response.similar || []));
        parts.push(addToSpeciesForm(card));
      }
    }
    card._extras.replaceChildren(...parts);
    markOutliers(card);
  }

  function priorOf(response) {
    return (response.evidence && response.evidence.prior) || response.prior || null;
  }

  // How the prior's factor reads: a flag, never a reason to hide a species.
  function expectation(factor) {
    const f = Number(factor);
    if (!Number.isFinite(f) || Math.abs(f - 1) < 1e-9) return "none";
    if (f > 1) return "expected";
    return f >= 0.25 ? "seldom" : "rare";
  }

  function priorContext(prior) {
    return t(prior.usedLocation && prior.usedDate ? "prior.ctx.both"
      : prior.usedLocation ? "prior.ctx.place" : "prior.ctx.date");
  }

  function expectationFlag(prior, shift) {
    const kind = expectation(shift.priorFactor);
    return h("span", { class: "flag " + kind, "data-expect": kind,
                       title: t("prior.factor", { value: Number(shift.priorFactor).toFixed(2) }),
                       text: t("prior.flag." + kind, { ctx: priorContext(prior) }) });
  }

  function shiftFor(prior, species) {
    return prior && prior.applied && species
      ? (prior.shifts || []).find((s) => s.species === species) : null;
  }

  function candidatesOf(response) {
    if ((response.candidates || []).length) return response.candidates;
    if ((response.classifierCandidates || []).length) return response.classifierCandidates;
    return response.prototypeCandidates || [];
  }

  function inTaxon(species, taxon) {
    const record = state.species.find((s) => s.scientificName === species);
    const lineage = (record && record.taxonomy && record.taxonomy.lineage) || [];
    return lineage.some((x) => x.name === taxon);
  }

  function decisionNodes(response, find) {
    const d = response.decision || {};
    const prior = priorOf(response);
    const nodes = [];
    const rejected = d.method === "METHOD_REJECTED" || (!d.species && !d.taxon);
    if (rejected) {
      const tips = ["closer", "angle", "crop", "sharp"];
      if (!find || !find.place) tips.push("place");
      nodes.push(h("p", { class: "decision-label", text: t("method.METHOD_REJECTED") }),
                 h("h3", { class: "decision dontknow", text: t("result.dontknow") }),
                 h("p", { class: "muted", text: t("result.dontknow.help") }),
                 h("ul", { class: "help-tips" }, tips.map((k) => h("li", { text: t("tip." + k) }))));
    } else if (!d.species) {
      // A genus, a family...: said first, with the candidate species below.
      const all = candidatesOf(response);
      const inside = all.filter((c) => inTaxon(c.species, d.taxon));
      const shown = inside.length ? inside : all;
      nodes.push(h("p", { class: "decision-label", text: t("result.unsure") }),
                 h("h3", { class: "decision taxon" },
                   t("rank." + d.rank) + " ", h("span", { class: "sci", text: d.taxon }),
                   " — " + percent(d.confidence)),
                 h("p", { class: "names" }, vernacular(response.taxonomy)),
                 h("p", { class: "unsure-help muted",
                          text: t("result.unsure.help", { rank: t("rank." + d.rank).toLowerCase() }) }),
                 h("h4", { text: t(inside.length ? "result.unsure.species" : "result.unsure.any") }),
                 h("ol", { class: "taxon-candidates" }, shown.map((c) => {
                   const shift = shiftFor(prior, c.species);
                   return h("li", {}, speciesLink(c.species), " — " + percent(c.score),
                            shift ? [" ", expectationFlag(prior, shift)] : null);
                 })));
    } else {
      const shift = shiftFor(prior, d.species);
      nodes.push(h("p", { class: "decision-label", text: t("result.species") }),
                 h("h3", { class: "decision" }, speciesOrTaxon(d)),
                 h("p", { class: "names" }, vernacular(response.taxonomy)));
      if (shift) nodes.push(h("p", { class: "expect" }, expectationFlag(prior, shift)));
    }
    const zeroShot = state.info && state.info.mode === "zero-shot";
    const what = d.method === "METHOD_OBSERVATION" ? t("result.confidence.observation")
      : zeroShot ? t("result.confidence.zeroshot") : t("result.confidence.hybrid");
    nodes.push(h("p", { class: "confidence" },
      h("span", { text: t("result.confidence", { value: percent(d.confidence) }) }), " ",
      h("meter", { min: "0", max: "1", value: String(d.confidence || 0),
                   "aria-label": t("result.confidence", { value: percent(d.confidence) }) }),
      h("br"), h("small", { class: "muted",
        text: what + " · " + t("result.method", { value: t("method." + d.method) }) })));
    // Without a place or date, IdentifyResponse has no prior: say the answer is photos-only.
    if (prior || find) nodes.push(priorBlock(prior || { applied: false, reason: "" }, response));
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

  function priorBlock(prior, response) {
    const section = h("section", { class: "prior", "data-applied": prior.applied ? "1" : "0" },
                      h("h4", { text: t("prior.heading") }));
    if (!prior.applied) {
      const sent = Boolean(prior.reason) && !/no location or observed_on/.test(prior.reason);
      section.append(h("p", { class: "muted", text: sent
        ? t("prior.unused", { reason: prior.reason }) : t("prior.none") }));
      return section;
    }
    section.append(h("p", { class: "prior-used", text: t("prior.used", {
      place: t(prior.usedLocation ? "yes" : "no"), date: t(prior.usedDate ? "yes" : "no") }) }));
    if (prior.changedAnswer) {
      section.append(h("p", { class: "prior-changed" }, t("prior.changed") + " ",
        h("span", { class: "sci", text: prior.answerWithoutPrior }),
        " (" + percent(prior.confidenceWithoutPrior) + ")."));
    }
    section.append(h("ul", { class: "shifts" }, (prior.shifts || []).map((s) =>
      h("li", { "data-species": s.species }, speciesLink(s.species), " ", expectationFlag(prior, s),
        h("br"), h("small", { class: "muted", text: t("prior.shift", {
          before: percent(s.withoutPrior), after: percent(s.withPrior) }) })))));
    return section;
  }

  function contributionsBlock(response, find) {
    const evidence = response.evidence || {};
    const d = response.decision || {};
    const answer = d.species || d.taxon || "";
    const items = (evidence.photos || []).map((e) => {
      const i = Number(e.index || 0);
      const photo = find.photos[i];
      const outlier = Number(e.outlierProbability || 0);
      let status, kind;
      if (e.excluded) { status = t("contrib.excluded", { value: percent(outlier) }); kind = "excluded"; }
      else if (outlier >= 0.5) { status = t("contrib.outlier", { value: percent(outlier) }); kind = "outlier"; }
      else if (e.agrees) { status = t("contrib.agrees"); kind = "agrees"; }
      else { status = t("contrib.differs"); kind = "differs"; }
      return h("li", { class: "contribution " + kind, "data-index": String(i) },
        h("strong", { text: t("photo.n", { n: i + 1 }) }),
        photo && photo.file.name ? h("span", { class: "muted", text: " (" + photo.file.name + ")" }) : null,
        h("br"),
        t("contrib.own") + " ", speciesLink(e.topSpecies || "—"), " — " + percent(e.topProbability),
        answer ? [h("br"), t("contrib.answer", { value: percent(e.answerProbability) })] : null,
        h("br"), h("span", { class: "status", text: status }));
    });
    const effective = Number(evidence.effectivePhotos || 0);
    return h("section", { class: "contributions" },
      h("h4", { text: t("contrib.heading") }),
      h("p", { class: "muted", text: t("contrib.summary", {
        count: find.photos.length, effective: effective.toFixed(1),
        combiner: evidence.combiner || "" }) }),
      h("ol", {}, items));
  }

  // Flags the photos of the strip that the answer judged to show another organism.
  function markOutliers(card) {
    const response = card._response;
    const evidence = (card.dataset.state === "done" && response && response.evidence &&
                      response.evidence.photos) || [];
    for (const figure of card._strip.querySelectorAll("figure.photo")) {
      const e = evidence.find((x) => Number(x.index || 0) === Number(figure.dataset.index));
      const other = Boolean(e && (e.excluded || Number(e.outlierProbability || 0) >= 0.5));
      figure.classList.toggle("other-organism", other);
      let badge = figure.querySelector(".badge");
      if (other && !badge) {
        badge = h("span", { class: "badge" });
        figure.querySelector("figcaption").prepend(badge);
      }
      if (badge) {
        if (other) badge.textContent = t("contrib.badge");
        else badge.remove();
      }
    }
  }

  function speciesOrTaxon(d) {
    return d.species ? speciesLink(d.species) : h("span", { class: "sci", text: d.taxon });
  }

  function candidatesBlock(response) {
    const groups = [
      ["result.candidates.combined", response.candidates || []],
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
    const choice = $("on-device");
    if (choice) {
      choice.checked = state.deviceChosen;
      choice.addEventListener("change", () => {
        state.deviceChosen = choice.checked;
        localStorage.setItem("biolit-device", choice.checked ? "1" : "0");
        prepareDevice();
      });
    }
    window.addEventListener("online", sendQueued);
  }

  // Downloads wait until no identification is under way, so they never delay an answer.
  function whenIdle(work, quietMs) {
    let quietSince = performance.now();
    const tick = () => {
      if (document.querySelector(".result[data-state=pending]")) quietSince = performance.now();
      if (performance.now() - quietSince >= (quietMs || 2000)) work();
      else setTimeout(tick, 250);
    };
    setTimeout(tick, 250);
  }

  // After an online visit the page, the model and the decision are cached: the page then
  // works without the network (sw.js, device.js).
  function prepareDevice() {
    const dev = device();
    const status = $("device-status");
    if (!dev) return Promise.resolve();
    // Chosen: the model is made ready now; otherwise only downloaded (no compilation),
    // and made ready at the first identification without the network.
    const work = state.deviceChosen
      ? dev.load({ ...deviceOptions(), refresh: true }).then((s) => ["ready", s.threads])
      : dev.prefetch(deviceOptions()).then(() => ["cached", 0]);
    return dev.registerWorker().then(() => work)
      .then(([stateName, threads]) => {
        if (status) status.textContent = t("device." + stateName, { threads });
        document.body.dataset.device = stateName;
      })
      .catch(() => {
        if (status) status.textContent = t("device.unavailable");
        document.body.dataset.device = "unavailable";
      });
  }

  window.BIOLIT_UPLOAD = { downsizeForUpload, readExif, UPLOAD_SHORT_SIDE };  // what the page sends
  wire();
  applyLanguage();
  route();
  loadInfo().then(() => document.body.setAttribute("data-ready", "1"));
  whenIdle(() => prepareDevice().then(sendQueued));
})();
