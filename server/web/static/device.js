// Identification on the device: the service's own image tower and decision, as ONNX graphs
// (GET /v1/models), run by onnxruntime-web (WebAssembly) in this page.
//
// * The pixels are the server's (server/inference/preprocess.py): the photo the page would
//   upload, decoded upright, squashed to size x size by a port of Pillow's BILINEAR resize
//   (8-bit fixed point, bit-exact), normalised with the model's mean and std in float32.
// * The decision is the exported graph (server/device/decision_graph.py): no decision rule is
//   written here; this file only reads its outputs (species index, rank, taxon, method).
// * Artifacts are kept in the Cache API under their content-addressed URLs; the listing
//   says which are current, the rest is dropped (an update of the bundle, model or gallery).
// * Identifications made offline are queued in IndexedDB (embedding, place, date) and sent
//   when the network returns (app.js sends them, as embeddings).
"use strict";

(function () {
  const LISTING = "/v1/models";
  const CACHE = "biolit-models";
  const DB = "biolit-device";
  const STORE = "queue";
  const RANK_ENUM = { kingdom: "RANK_KINGDOM", phylum: "RANK_PHYLUM", class: "RANK_CLASS",
                      order: "RANK_ORDER", family: "RANK_FAMILY", genus: "RANK_GENUS",
                      species: "RANK_SPECIES" };
  let loaded = null;  // Promise of the sessions

  function headers(key) {
    return key ? { Authorization: "Bearer " + key } : {};
  }

  // ------------------------------------------------------------ artifacts

  async function listing(key) {
    const cache = await caches.open(CACHE);
    try {
      const response = await fetch(LISTING, { headers: headers(key), cache: "no-cache",
                                              credentials: "omit" });
      if (!response.ok) throw new Error("GET /v1/models: HTTP " + response.status);
      const body = await response.clone().json();
      await cache.put(LISTING, response);
      await prune(cache, body);
      return body;
    } catch (err) {
      const cached = await cache.match(LISTING);
      if (cached) return cached.json();
      throw err;
    }
  }

  // Drop what the current listing no longer names: the fingerprint changed.
  async function prune(cache, body) {
    const wanted = new Set(body.artifacts.map((a) => new URL(a.url, location.href).href));
    wanted.add(new URL(LISTING, location.href).href);
    for (const request of await cache.keys()) {
      if (!wanted.has(request.url)) await cache.delete(request);
    }
  }

  async function artifact(entry, key) {
    const cache = await caches.open(CACHE);
    let response = await cache.match(entry.url);
    if (!response) {
      response = await fetch(entry.url, { headers: headers(key), credentials: "omit" });
      if (!response.ok) throw new Error("GET " + entry.url + ": HTTP " + response.status);
      await cache.put(entry.url, response.clone());
    }
    return new Uint8Array(await response.arrayBuffer());
  }

  function pick(body, name, variant) {
    const all = body.artifacts.filter((a) => a.name === name);
    return all.find((a) => a.variant === variant) || all[0];
  }

  // The sessions, made once (again with refresh: true, which re-reads the listing).
  // options: { key, precision: "fp32" (default) or "int8", refresh }.
  function load(options) {
    const opts = options || {};
    if (loaded && !opts.refresh) return loaded;
    const run = async () => {
      const body = await listing(opts.key);
      const ort = window.ort;
      ort.env.wasm.wasmPaths = "/static/";
      ort.env.wasm.numThreads = self.crossOriginIsolated
        ? Math.max(1, Math.min(4, navigator.hardwareConcurrency || 1)) : 1;
      const towerEntry = pick(body, "image_tower", opts.precision || "fp32");
      const decisionEntry = pick(body, "decision", "onnx");
      const [towerBytes, decisionBytes] = await Promise.all([
        artifact(towerEntry, opts.key), artifact(decisionEntry, opts.key)]);
      const sessionOptions = { executionProviders: ["wasm"], graphOptimizationLevel: "all" };
      const tower = await ort.InferenceSession.create(towerBytes, sessionOptions);
      const decision = await ort.InferenceSession.create(decisionBytes, sessionOptions);
      const meta = decisionEntry.metadata || {};
      return {
        fingerprint: body.fingerprint, listing: body, tower, decision,
        towerVariant: towerEntry.variant, threads: ort.env.wasm.numThreads,
        spec: body.preprocessing,
        species: JSON.parse(meta.species || "[]"),
        ranks: JSON.parse(meta.ranks || "[]"),
        taxa: JSON.parse(meta.taxa || "{}"),
        methods: JSON.parse(meta.methods || "{}"),
      };
    };
    // Offline with nothing cached: the error says so, and a later call tries again.
    loaded = run().catch((err) => { loaded = null; throw err; });
    return loaded;
  }

  // Downloads what load() needs into the cache, without compiling anything (cheap: the
  // page does it once online, so that it can identify when the network is gone).
  async function prefetch(options) {
    const opts = options || {};
    const body = await listing(opts.key);
    const tower = pick(body, "image_tower", opts.precision || "fp32");
    const decision = pick(body, "decision", "onnx");
    const cache = await caches.open(CACHE);
    for (const entry of [tower, decision]) {
      if (await cache.match(entry.url)) continue;
      const response = await fetch(entry.url, { headers: headers(opts.key), credentials: "omit" });
      if (!response.ok) throw new Error("GET " + entry.url + ": HTTP " + response.status);
      await cache.put(entry.url, response);
    }
    // The runtime's own files are kept by the service worker (sw.js, at its install).
    return { fingerprint: body.fingerprint, tower: tower.variant, bytes: tower.bytes + decision.bytes };
  }

  // ------------------------------------------------------------ pixels

  // Pillow's precompute_coeffs + normalize_coeffs_8bpc (src/libImaging/Resample.c), bilinear.
  const PRECISION_BITS = 32 - 8 - 2;
  function coefficients(inSize, outSize) {
    const scale = inSize / outSize;
    const filterscale = Math.max(1.0, scale);
    const support = 1.0 * filterscale;
    const ksize = Math.ceil(support) * 2 + 1;
    const bounds = new Int32Array(outSize * 2);
    const kk = new Int32Array(outSize * ksize);
    const k = new Float64Array(ksize);
    for (let xx = 0; xx < outSize; xx++) {
      const center = (xx + 0.5) * scale;
      const ss = 1.0 / filterscale;
      let xmin = Math.trunc(center - support + 0.5);
      if (xmin < 0) xmin = 0;
      let xmax = Math.trunc(center + support + 0.5);
      if (xmax > inSize) xmax = inSize;
      xmax -= xmin;
      let ww = 0.0;
      for (let x = 0; x < xmax; x++) {
        let arg = (x + xmin - center + 0.5) * ss;
        if (arg < 0) arg = -arg;
        const w = arg < 1.0 ? 1.0 - arg : 0.0;
        k[x] = w;
        ww += w;
      }
      for (let x = 0; x < ksize; x++) {
        let v = x < xmax ? (ww !== 0.0 ? k[x] / ww : k[x]) : 0;
        v = v < 0 ? Math.trunc(-0.5 + v * (1 << PRECISION_BITS))
          : Math.trunc(0.5 + v * (1 << PRECISION_BITS));
        kk[xx * ksize + x] = v;
      }
      bounds[xx * 2] = xmin;
      bounds[xx * 2 + 1] = xmax;
    }
    return { ksize, bounds, kk };
  }

  function clip8(v) {
    const shifted = Math.floor(v / (1 << PRECISION_BITS));
    return shifted < 0 ? 0 : shifted > 255 ? 255 : shifted;
  }

  // RGB (3 bytes a pixel) w x h -> outW x outH, as PIL's img.resize((outW, outH), BILINEAR).
  function pilBilinear(rgb, w, h, outW, outH) {
    let src = rgb, width = w;
    if (outW !== w) {
      const { ksize, bounds, kk } = coefficients(w, outW);
      const tmp = new Uint8Array(outW * h * 3);
      for (let y = 0; y < h; y++) {
        for (let xx = 0; xx < outW; xx++) {
          const xmin = bounds[xx * 2], xmax = bounds[xx * 2 + 1], o = xx * ksize;
          let s0 = 1 << (PRECISION_BITS - 1), s1 = s0, s2 = s0;
          for (let x = 0; x < xmax; x++) {
            const p = (y * w + x + xmin) * 3, c = kk[o + x];
            s0 += src[p] * c; s1 += src[p + 1] * c; s2 += src[p + 2] * c;
          }
          const q = (y * outW + xx) * 3;
          tmp[q] = clip8(s0); tmp[q + 1] = clip8(s1); tmp[q + 2] = clip8(s2);
        }
      }
      src = tmp; width = outW;
    }
    if (outH === h) return src;
    const { ksize, bounds, kk } = coefficients(h, outH);
    const out = new Uint8Array(width * outH * 3);
    for (let yy = 0; yy < outH; yy++) {
      const ymin = bounds[yy * 2], ymax = bounds[yy * 2 + 1], o = yy * ksize;
      for (let xx = 0; xx < width; xx++) {
        let s0 = 1 << (PRECISION_BITS - 1), s1 = s0, s2 = s0;
        for (let y = 0; y < ymax; y++) {
          const p = ((y + ymin) * width + xx) * 3, c = kk[o + y];
          s0 += src[p] * c; s1 += src[p + 1] * c; s2 += src[p + 2] * c;
        }
        const q = (yy * width + xx) * 3;
        out[q] = clip8(s0); out[q + 1] = clip8(s1); out[q + 2] = clip8(s2);
      }
    }
    return out;
  }

  // A photo (Blob) -> its upright RGB bytes, decoded by the browser.
  async function decodeRGB(blob) {
    const bitmap = await createImageBitmap(blob, { imageOrientation: "from-image",
                                                   colorSpaceConversion: "none",
                                                   premultiplyAlpha: "none" });
    const w = bitmap.width, h = bitmap.height;
    const canvas = new OffscreenCanvas(w, h);
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.fillStyle = "#fff";  // alpha over white, as the server composites it
    ctx.fillRect(0, 0, w, h);
    ctx.drawImage(bitmap, 0, 0);
    bitmap.close();
    const rgba = ctx.getImageData(0, 0, w, h).data;
    const rgb = new Uint8Array(w * h * 3);
    for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) {
      rgb[j] = rgba[i]; rgb[j + 1] = rgba[i + 1]; rgb[j + 2] = rgba[i + 2];
    }
    return { rgb, w, h };
  }

  // The model's input [1, 3, size, size] float32, as server/inference/preprocess.py makes it.
  async function preprocess(blob, spec) {
    const size = spec.size;
    const { rgb, w, h } = await decodeRGB(blob);
    const small = pilBilinear(rgb, w, h, size, size);
    const f = Math.fround;
    const inv255 = f(1.0 / 255.0);
    const mean = spec.mean.map(f), std = spec.std.map(f);
    const out = new Float32Array(3 * size * size);
    const plane = size * size;
    for (let i = 0; i < plane; i++) {
      for (let c = 0; c < 3; c++) {
        out[c * plane + i] = f(f(f(small[i * 3 + c] * inv255) - mean[c]) / std[c]);
      }
    }
    return out;
  }

  // ------------------------------------------------------------ identify

  async function embed(blob, options) {
    const s = await load(options);
    const pixels = await preprocess(blob, s.spec);
    const ort = window.ort;
    const size = s.spec.size;
    const feeds = { [s.tower.inputNames[0]]: new ort.Tensor("float32", pixels, [1, 3, size, size]) };
    const raw = (await s.tower.run(feeds))[s.tower.outputNames[0]].data;
    let norm = 0;
    for (const v of raw) norm += v * v;
    norm = Math.sqrt(norm) || 1;
    return Float32Array.from(raw, (v) => v / norm);
  }

  async function decide(embedding, options) {
    const s = await load(options);
    const ort = window.ort;
    const out = await s.decision.run({
      embedding: new ort.Tensor("float32", embedding, [1, embedding.length]) });
    const answer = Number(out.answer.data[0]);
    const rank = Number(out.rank.data[0]);
    const taxon = Number(out.taxon.data[0]);
    const method = s.methods[String(Number(out.method.data[0]))] || "REJECTED";
    const probs = out.probabilities.data;
    const order = Array.from(probs.keys()).sort((a, b) => probs[b] - probs[a]).slice(0, 5);
    const decision = { species: "", taxon: "", rank: "RANK_UNSPECIFIED",
                       confidence: Number(out.confidence.data[0]), method: "METHOD_" + method };
    if (answer >= 0) {
      decision.species = decision.taxon = s.species[answer];
      decision.rank = "RANK_SPECIES";
    } else if (rank >= 0) {
      const name = s.ranks[rank];
      decision.rank = RANK_ENUM[name] || "RANK_UNSPECIFIED";
      decision.taxon = s.taxa[name][taxon];
    }
    return {
      decision,
      candidates: order.filter((i) => probs[i] > 0).map((i) => ({ species: s.species[i],
                                                                    score: probs[i] })),
      similar: [],
      device: { fingerprint: s.fingerprint, tower: s.towerVariant, threads: s.threads },
    };
  }

  async function identify(blob, options) {
    const started = performance.now();
    const embedding = await embed(blob, options);
    const response = await decide(embedding, options);
    response.embedding = embedding;
    response.device.ms = performance.now() - started;
    return response;
  }

  // ------------------------------------------------------------ the offline queue

  function db() {
    return new Promise((resolve, reject) => {
      const open = indexedDB.open(DB, 1);
      open.onupgradeneeded = () => open.result.createObjectStore(STORE, { keyPath: "id",
                                                                         autoIncrement: true });
      open.onsuccess = () => resolve(open.result);
      open.onerror = () => reject(open.error);
    });
  }

  async function tx(mode, work) {
    const handle = await db();
    return new Promise((resolve, reject) => {
      const t = handle.transaction(STORE, mode);
      const result = work(t.objectStore(STORE));
      t.oncomplete = () => { handle.close(); resolve(result.result); };
      t.onerror = () => { handle.close(); reject(t.error); };
    });
  }

  const queue = {
    // record: { embedding: Float32Array, name, place, date, at }
    add: (record) => tx("readwrite", (s) => s.add(record)),
    all: () => tx("readonly", (s) => s.getAll()),
    remove: (id) => tx("readwrite", (s) => s.delete(id)),
  };

  // ------------------------------------------------------------ the service worker

  function registerWorker() {
    if (!("serviceWorker" in navigator)) return Promise.resolve(null);
    return navigator.serviceWorker.register("/sw.js", { scope: "/" }).catch(() => null);
  }

  window.BIOLIT_DEVICE = { load, prefetch, preprocess, pilBilinear, embed, decide, identify, queue,
                           registerWorker, listing };
})();
