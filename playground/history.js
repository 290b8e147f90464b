// This browser's images, kept in IndexedDB: each with the request that made it, the API's
// `kiln` settings, the image (and for edits the input and mask, so an edit can be redone).

const DB_NAME = 'kiln-playground';
const STORE = 'images';
/** Oldest entries beyond this are dropped (images are up to a few MB each). */
export const HISTORY_LIMIT = 60;

let opened;

function db() {
  opened ??= new Promise((resolve, reject) => {
    const req = indexedDB.open(DB_NAME, 1);
    req.onupgradeneeded = () => req.result.createObjectStore(STORE, { keyPath: 'id', autoIncrement: true });
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
  return opened;
}

function done(req) {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

async function store(mode) {
  return (await db()).transaction(STORE, mode).objectStore(STORE);
}

/** Adds an entry, returns its id; trims the oldest past HISTORY_LIMIT. */
export async function addEntry(entry) {
  const id = await done((await store('readwrite')).add(entry));
  const keys = await done((await store('readonly')).getAllKeys());
  if (keys.length > HISTORY_LIMIT) {
    const s = await store('readwrite');
    for (const key of keys.slice(0, keys.length - HISTORY_LIMIT)) s.delete(key);
  }
  return id;
}

/** Every entry, newest first. */
export async function listEntries() {
  const all = await done((await store('readonly')).getAll());
  return all.reverse();
}

export async function getEntry(id) {
  return done((await store('readonly')).get(id));
}

export async function clearEntries() {
  await done((await store('readwrite')).clear());
}

/** A small WebP (PNG where WebP encoding is missing) of `blob`, for the history list. */
export async function thumbnail(blob, size = 160) {
  const bitmap = await createImageBitmap(blob);
  const scale = Math.min(1, size / Math.max(bitmap.width, bitmap.height));
  const canvas = document.createElement('canvas');
  canvas.width = Math.max(1, Math.round(bitmap.width * scale));
  canvas.height = Math.max(1, Math.round(bitmap.height * scale));
  const ctx = canvas.getContext('2d');
  ctx.imageSmoothingQuality = 'high';
  ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  bitmap.close();
  return new Promise((resolve) => canvas.toBlob(resolve, 'image/webp', 0.85));
}
