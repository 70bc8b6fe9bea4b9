// The page's service worker (served at /sw.js, scope /): the page works without the network.
//
// * The page and its static files: network first, the cached copy when the network is
//   down (so an update of the page is picked up at the next online visit).
// * GET /v1/info and /v1/species: the same, so the names and lineages show offline.
// * The model artifacts (/v1/models/...): content-addressed, so the cache answers first.
//   device.js keeps them (cache "biolit-models") and drops those the current listing no
//   longer names: a new bundle, model or gallery (another fingerprint) replaces them.
// * Everything else (identify, curation) goes to the network: an identification without
//   the network is made on the device by device.js, and queued for the server.
"use strict";

const SHELL = "biolit-shell-v1";
const MODELS = "biolit-models";
const SHELL_FILES = [
  "/", "/static/app.js", "/static/i18n.js", "/static/style.css", "/static/exif-reader.js",
  "/static/device.js", "/static/ort.wasm.min.js", "/static/ort-wasm-simd-threaded.mjs",
  "/static/ort-wasm-simd-threaded.wasm",
];
const READS = ["/v1/info", "/v1/species"];

self.addEventListener("install", (event) => {
  event.waitUntil(caches.open(SHELL).then((cache) => cache.addAll(SHELL_FILES))
    .then(() => self.skipWaiting()));
});

self.addEventListener("activate", (event) => {
  event.waitUntil(caches.keys().then((names) => Promise.all(
    names.filter((n) => n !== SHELL && n !== MODELS).map((n) => caches.delete(n))))
    .then(() => self.clients.claim()));
});

async function networkFirst(request, cacheName) {
  const cache = await caches.open(cacheName);
  try {
    const response = await fetch(request);
    if (response.ok) await cache.put(request, response.clone());
    return response;
  } catch (err) {
    const cached = await cache.match(request, { ignoreSearch: false });
    if (cached) return cached;
    throw err;
  }
}

async function cacheFirst(request) {
  const cache = await caches.open(MODELS);
  const cached = await cache.match(request);
  if (cached) return cached;
  const response = await fetch(request);
  if (response.ok) await cache.put(request, response.clone());
  return response;
}

self.addEventListener("fetch", (event) => {
  const request = event.request;
  if (request.method !== "GET") return;
  const url = new URL(request.url);
  if (url.origin !== self.location.origin) return;
  if (url.pathname.startsWith("/v1/models/")) {
    event.respondWith(cacheFirst(request));
  } else if (url.pathname === "/" || url.pathname.startsWith("/static/")) {
    event.respondWith(networkFirst(request, SHELL));
  } else if (READS.includes(url.pathname)) {
    event.respondWith(networkFirst(request, SHELL));
  }
});
