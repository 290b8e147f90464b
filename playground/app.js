// Kiln's playground: a form over the public images API (see api.js), live previews from the
// streamed answer, the result with the settings that made it, copy-as-code, edits with a
// painted mask, and a history kept in this browser.
import { ApiError, base64Blob, hasApiKey, listModels, setApiKey, streamImages } from './api.js';
import { codeSnippets, reproducingFields } from './code.js';
import { addEntry, clearEntries, getEntry, listEntries, thumbnail } from './history.js';
import { MaskEditor } from './mask.js';

const $ = (id) => document.getElementById(id);
const el = {};
for (const id of [
  'form', 'model', 'key-button', 'prompt', 'negative', 'edit-section', 'upload', 'canvas-wrap', 'image-canvas', 'mask-canvas',
  'mask-tools', 'brush-size', 'brush-size-value', 'mask-clear', 'mask-invert', 'strength-row', 'strength', 'strength-value',
  'pose-hint', 'size', 'custom-size', 'width', 'height', 'quality', 'steps', 'scheduler', 'guidance', 'seed-mode', 'seed',
  'previews', 'generate', 'error', 'progress', 'progress-bar', 'progress-text', 'cancel', 'result-figure', 'result',
  'result-caption', 'pose-figure', 'pose-image', 'settings', 'actions', 'download', 'download-input', 'download-mask',
  'reuse-seed', 'code', 'copy', 'clear-history', 'history-empty', 'history', 'key-dialog', 'key-form', 'key-message',
  'key-input', 'key-remember', 'key-cancel',
]) {
  el[id.replace(/-(\w)/g, (_, c) => c.toUpperCase())] = $(id);
}

const MIME = { png: 'image/png', jpeg: 'image/jpeg', webp: 'image/webp' };
const DEFAULT_STRENGTH = { img2img: 0.75, inpaint: 1 };

const state = {
  mode: 'generate',
  editMode: 'img2img',
  /** The picture to edit: {blob, name}. */
  upload: null,
  /** The result on show: {entry, urls}. */
  shown: null,
  lastSeed: undefined,
  controller: null,
  lang: 'curl',
  strengthTouched: false,
};
const mask = new MaskEditor(el.imageCanvas, el.maskCanvas);

// ---- small helpers -------------------------------------------------------------------------

function showError(message) {
  el.error.textContent = message;
  el.error.hidden = !message;
}

function setSelected(buttons, pick) {
  for (const b of buttons) b.setAttribute('aria-selected', String(pick(b)));
}

function seconds(ms) {
  return `${(ms / 1000).toFixed(ms < 10_000 ? 2 : 1)} s`;
}

function extOf(type) {
  return Object.keys(MIME).find((k) => MIME[k] === type) ?? 'png';
}

/** Asks for the API key, showing why (the API's 401 message); resolves true once one is given. */
function askKey(message) {
  el.keyMessage.textContent = message;
  el.keyInput.value = '';
  el.keyDialog.showModal();
  el.keyInput.focus();
  return new Promise((resolve) => {
    const finish = (given) => {
      el.keyForm.removeEventListener('submit', onSubmit);
      el.keyCancel.removeEventListener('click', onCancel);
      el.keyDialog.removeEventListener('cancel', onCancel);
      el.keyDialog.close();
      resolve(given);
    };
    const onSubmit = (e) => {
      e.preventDefault();
      if (!el.keyInput.value.trim()) return;
      setApiKey(el.keyInput.value, el.keyRemember.checked);
      finish(true);
    };
    const onCancel = (e) => {
      e.preventDefault();
      finish(false);
    };
    el.keyForm.addEventListener('submit', onSubmit);
    el.keyCancel.addEventListener('click', onCancel);
    el.keyDialog.addEventListener('cancel', onCancel);
  });
}

/** Runs `action`; on a 401 asks for a key (with the server's message) and tries again. */
async function withKey(action) {
  for (;;) {
    try {
      return await action();
    } catch (err) {
      if (!(err instanceof ApiError) || err.status !== 401) throw err;
      if (!(await askKey(err.message))) throw err;
    }
  }
}

// ---- models --------------------------------------------------------------------------------

async function loadModels() {
  try {
    const models = await withKey(listModels);
    const keep = el.model.value || localStorage.getItem('kiln-model') || '';
    el.model.replaceChildren(new Option('server default', ''));
    for (const m of models) el.model.add(new Option(m.id, m.id));
    if ([...el.model.options].some((o) => o.value === keep)) el.model.value = keep;
    el.model.dataset.loaded = 'true';
  } catch (err) {
    showError(err.message);
  }
}

// ---- form ----------------------------------------------------------------------------------

function setMode(mode) {
  state.mode = mode;
  setSelected(document.querySelectorAll('.tabs [data-mode]'), (b) => b.dataset.mode === mode);
  el.editSection.hidden = mode !== 'edit';
  // An edit's natural size is the upload's own shape.
  if (mode === 'edit' && el.size.value === '1024x1024' && !el.size.dataset.touched) el.size.value = 'auto';
  syncForm();
}

function setEditMode(mode) {
  state.editMode = mode;
  for (const r of document.querySelectorAll('input[name="edit-mode"]')) r.checked = r.value === mode;
  if (!state.strengthTouched && DEFAULT_STRENGTH[mode] !== undefined) el.strength.value = String(DEFAULT_STRENGTH[mode]);
  syncForm();
}

function syncForm() {
  const edit = state.mode === 'edit';
  el.customSize.hidden = el.size.value !== 'custom';
  el.canvasWrap.hidden = !edit || !state.upload;
  el.maskTools.hidden = !edit || state.editMode !== 'inpaint' || !state.upload;
  el.maskCanvas.hidden = state.editMode !== 'inpaint';
  el.strengthRow.hidden = !edit || state.editMode === 'pose';
  el.poseHint.hidden = !edit || state.editMode !== 'pose';
  el.strengthValue.textContent = Number(el.strength.value).toFixed(2);
  el.brushSizeValue.textContent = el.brushSize.value;
  const seedMode = el.seedMode.value;
  el.seed.disabled = seedMode !== 'fixed';
  if (seedMode === 'last') el.seed.value = state.lastSeed ?? '';
  el.seed.placeholder = seedMode === 'last' && state.lastSeed === undefined ? 'no image yet' : 'random';
  if (seedMode === 'random') el.seed.value = '';
}

function numberOrUndefined(input) {
  return input.value.trim() === '' ? undefined : Number(input.value);
}

/** The request's fields as the form says (the API checks them; its message is shown when one is wrong). */
function readRequest() {
  const r = { prompt: el.prompt.value };
  if (el.model.value) r.model = el.model.value;
  if (el.negative.value.trim()) r.negative_prompt = el.negative.value;
  r.size = el.size.value === 'custom' ? `${el.width.value}x${el.height.value}` : el.size.value;
  r.quality = el.quality.value;
  const steps = numberOrUndefined(el.steps);
  if (steps !== undefined) r.steps = steps;
  if (el.scheduler.value) r.scheduler = el.scheduler.value;
  const guidance = numberOrUndefined(el.guidance);
  if (guidance !== undefined) r.guidance_scale = guidance;
  const seedMode = el.seedMode.value;
  if (seedMode === 'fixed' && el.seed.value.trim() !== '') r.seed = Number(el.seed.value);
  if (seedMode === 'last' && state.lastSeed !== undefined) r.seed = state.lastSeed;
  if (state.mode === 'edit') {
    r.edit_mode = state.editMode;
    if (state.editMode === 'pose') r.user = 'cn';
    else r.strength = Number(el.strength.value);
  }
  r.partial_images = Number(el.previews.value);
  return r;
}

/** Puts a stored request back into the form. */
function writeRequest(r, kiln) {
  // The mode first: entering edit mode may pick a size, which the entry's own then replaces.
  setMode(r.edit_mode ? 'edit' : 'generate');
  el.prompt.value = r.prompt ?? '';
  el.negative.value = r.negative_prompt ?? '';
  if (r.model && ![...el.model.options].some((o) => o.value === r.model)) el.model.add(new Option(r.model, r.model));
  el.model.value = r.model ?? '';
  if ([...el.size.options].some((o) => o.value === r.size)) el.size.value = r.size;
  else {
    const [w, h] = String(r.size).split('x');
    el.size.value = 'custom';
    el.width.value = w;
    el.height.value = h;
  }
  el.quality.value = r.quality ?? 'smooth';
  el.steps.value = r.steps ?? '';
  el.scheduler.value = r.scheduler ?? '';
  el.guidance.value = r.guidance_scale ?? '';
  el.previews.value = String(r.partial_images ?? 3);
  el.seedMode.value = 'fixed';
  el.seed.value = kiln.seed;
  if (r.edit_mode) {
    setEditMode(r.edit_mode);
    if (r.strength !== undefined) el.strength.value = String(r.strength);
  }
  syncForm();
}

// ---- edits: the upload and its mask ---------------------------------------------------------

async function useUpload(blob, name, maskBlob) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob);
  } catch {
    showError(`This browser cannot read ${name}; the server takes PNG, JPEG or WebP.`);
    return;
  }
  state.upload = { blob, name };
  const maskBitmap = maskBlob ? await createImageBitmap(maskBlob) : undefined;
  mask.load(bitmap, maskBitmap);
  bitmap.close();
  maskBitmap?.close();
  syncForm();
}

// ---- generating ----------------------------------------------------------------------------

let objectUrls = [];
function url(blob) {
  const u = URL.createObjectURL(blob);
  objectUrls.push(u);
  return u;
}
function releaseUrls() {
  for (const u of objectUrls) URL.revokeObjectURL(u);
  objectUrls = [];
}

function progress(text, fraction) {
  el.progress.hidden = false;
  el.progressText.textContent = text;
  if (fraction === undefined) el.progressBar.removeAttribute('value');
  else el.progressBar.value = fraction;
}

function showPreview(blob, event) {
  const previous = el.result.src;
  el.result.src = URL.createObjectURL(blob);
  if (previous.startsWith('blob:') && !objectUrls.includes(previous)) URL.revokeObjectURL(previous);
  el.result.dataset.kind = 'preview';
  el.result.dataset.step = String(event.step ?? '');
  el.resultFigure.classList.remove('empty');
  el.resultFigure.classList.add('drawing');
  el.resultCaption.textContent = `Preview ${event.partial_image_index + 1} of ${el.previews.value}, at step ${event.step} of ${event.total_steps}`;
}

async function generate() {
  if (state.controller) return;
  showError('');
  const request = readRequest();
  const edit = state.mode === 'edit';
  let body;
  let maskBlob;
  if (edit) {
    if (state.editMode === 'inpaint' && state.upload && mask.isEmpty()) {
      showError('Paint the part of the picture to redraw first (or pick Image to image).');
      return;
    }
    body = new FormData();
    // Without an upload the API says what is missing.
    if (state.upload) body.append('image', state.upload.blob, state.upload.name);
    if (state.editMode === 'inpaint' && state.upload) {
      maskBlob = await mask.toBlob();
      body.append('mask', maskBlob, 'mask.png');
    }
    for (const [k, v] of Object.entries(request)) if (k !== 'edit_mode') body.append(k, String(v));
    body.append('response_format', 'b64_json');
    body.append('stream', 'true');
  } else {
    body = { ...request, response_format: 'b64_json', stream: true };
  }

  const controller = new AbortController();
  state.controller = controller;
  el.generate.disabled = true;
  el.form.classList.add('busy');
  const started = performance.now();
  let drawing = false;
  const tick = setInterval(() => {
    if (!drawing) progress(`Waiting for the server… ${seconds(performance.now() - started)}`);
  }, 100);
  progress('Sending…');
  try {
    const done = await withKey(() =>
      streamImages(edit ? '/v1/images/edits' : '/v1/images/generations', body, {
        signal: controller.signal,
        onPartial(event) {
          drawing = true;
          const type = MIME[event.output_format] ?? 'image/png';
          progress(`Step ${event.step} of ${event.total_steps}`, event.step / event.total_steps);
          showPreview(base64Blob(event.b64_json, type), event);
        },
      }),
    );
    const elapsed = performance.now() - started;
    const type = MIME[done.output_format] ?? 'image/png';
    const entry = {
      created: Date.now(),
      request,
      kiln: done.kiln ?? {},
      elapsedMs: elapsed,
      image: base64Blob(done.b64_json, type),
      pose: done.b64_json_pose ? base64Blob(done.b64_json_pose, type) : undefined,
      input: edit ? state.upload?.blob : undefined,
      inputName: edit ? state.upload?.name : undefined,
      mask: maskBlob,
    };
    if (entry.kiln.seed === undefined && done.seed !== undefined) entry.kiln.seed = done.seed;
    showEntry(entry);
    try {
      entry.thumb = await thumbnail(entry.image);
      entry.id = await addEntry(entry);
      await renderHistory();
    } catch (err) {
      console.warn('history not saved', err);
    }
  } catch (err) {
    if (controller.signal.aborted) showError('Cancelled.');
    else showError(err.message || String(err));
    if (el.result.dataset.kind === 'preview') el.resultFigure.classList.add('failed');
  } finally {
    clearInterval(tick);
    state.controller = null;
    el.generate.disabled = false;
    el.form.classList.remove('busy');
    el.progress.hidden = true;
    el.resultFigure.classList.remove('drawing');
  }
}

function settingRows(entry) {
  const k = entry.kiln;
  const t = k.timings ?? {};
  const rows = [
    ['Seed', k.seed],
    ['Steps', k.steps],
    ['Scheduler', k.scheduler],
    ['Guidance', k.guidance_scale],
    ['Size', k.size],
    ['Model', k.model],
    ['Mode', k.mode],
    ['Strength', k.mode === 'pose' ? undefined : k.strength],
    ['People', k.mode === 'pose' ? k.people : undefined],
    ['Time', t.total_ms !== undefined ? `${seconds(t.total_ms)} (drawing ${seconds(t.generation_ms ?? 0)}, queued ${seconds(t.queue_ms ?? 0)})` : undefined],
  ];
  return rows.filter(([, v]) => v !== undefined && v !== null && v !== '');
}

function showEntry(entry) {
  releaseUrls();
  state.shown = entry;
  state.lastSeed = entry.kiln.seed;
  el.result.src = url(entry.image);
  el.result.alt = entry.request.prompt;
  el.result.dataset.kind = 'final';
  el.result.dataset.seed = String(entry.kiln.seed);
  el.resultFigure.classList.remove('empty', 'failed');
  el.resultCaption.textContent = entry.request.prompt;
  el.poseFigure.hidden = !entry.pose;
  if (entry.pose) el.poseImage.src = url(entry.pose);

  el.settings.replaceChildren();
  for (const [name, value] of settingRows(entry)) {
    const dt = document.createElement('dt');
    dt.textContent = name;
    const dd = document.createElement('dd');
    dd.textContent = String(value);
    dd.dataset.setting = name.toLowerCase();
    el.settings.append(dt, dd);
  }
  el.settings.hidden = false;

  const ext = extOf(entry.image.type);
  const out = `kiln-${entry.kiln.seed}.${ext}`;
  el.download.href = url(entry.image);
  el.download.download = out;
  const inputName = entry.input ? entry.inputName || 'input.png' : undefined;
  el.downloadInput.hidden = !entry.input;
  el.downloadMask.hidden = !entry.mask;
  if (entry.input) {
    el.downloadInput.href = url(entry.input);
    el.downloadInput.download = inputName;
  }
  if (entry.mask) {
    el.downloadMask.href = url(entry.mask);
    el.downloadMask.download = 'mask.png';
  }
  state.code = codeSnippets({
    origin: location.origin,
    fields: reproducingFields(entry.request, entry.kiln),
    edit: entry.input ? { image: inputName, mask: entry.mask ? 'mask.png' : undefined } : undefined,
    out,
    authorized: hasApiKey(),
  });
  showCode();
  el.actions.hidden = false;
  syncForm();
}

function showCode() {
  setSelected(document.querySelectorAll('.code-tabs [data-lang]'), (b) => b.dataset.lang === state.lang);
  el.code.textContent = state.code?.[state.lang] ?? '';
  el.code.dataset.lang = state.lang;
}

// ---- history -------------------------------------------------------------------------------

let thumbUrls = [];
async function renderHistory() {
  const entries = await listEntries();
  for (const u of thumbUrls) URL.revokeObjectURL(u);
  thumbUrls = [];
  el.history.replaceChildren();
  for (const entry of entries) {
    const li = document.createElement('li');
    const button = document.createElement('button');
    button.type = 'button';
    button.dataset.id = String(entry.id);
    button.title = `${entry.request.prompt}\nseed ${entry.kiln.seed} · ${entry.kiln.size} · ${entry.kiln.steps} steps`;
    const img = document.createElement('img');
    const u = URL.createObjectURL(entry.thumb ?? entry.image);
    thumbUrls.push(u);
    img.src = u;
    img.alt = entry.request.prompt;
    const caption = document.createElement('span');
    caption.textContent = `${entry.kiln.mode ?? 'generate'} · ${entry.kiln.seed}`;
    button.append(img, caption);
    li.append(button);
    el.history.append(li);
  }
  el.historyEmpty.hidden = entries.length > 0;
}

async function reuse(id) {
  const entry = await getEntry(id);
  if (!entry) return;
  showError('');
  writeRequest(entry.request, entry.kiln);
  if (entry.input) await useUpload(entry.input, entry.inputName || 'input.png', entry.mask);
  showEntry(entry);
}

// ---- wiring --------------------------------------------------------------------------------

for (const b of document.querySelectorAll('.tabs [data-mode]')) b.addEventListener('click', () => setMode(b.dataset.mode));
for (const r of document.querySelectorAll('input[name="edit-mode"]')) r.addEventListener('change', () => setEditMode(r.value));
for (const r of document.querySelectorAll('input[name="tool"]')) r.addEventListener('change', () => (mask.tool = r.value));
for (const b of document.querySelectorAll('.code-tabs [data-lang]')) {
  b.addEventListener('click', () => {
    state.lang = b.dataset.lang;
    showCode();
  });
}
el.brushSize.addEventListener('input', () => {
  mask.size = Number(el.brushSize.value);
  syncForm();
});
el.maskClear.addEventListener('click', () => mask.clear());
el.maskInvert.addEventListener('click', () => mask.invert());
el.strength.addEventListener('input', () => {
  state.strengthTouched = true;
  syncForm();
});
el.size.addEventListener('change', () => {
  el.size.dataset.touched = 'true';
  syncForm();
});
el.seedMode.addEventListener('change', syncForm);
el.model.addEventListener('change', () => localStorage.setItem('kiln-model', el.model.value));
el.upload.addEventListener('change', () => {
  const file = el.upload.files?.[0];
  if (file) useUpload(file, file.name);
});
el.form.addEventListener('submit', (e) => {
  e.preventDefault();
  generate();
});
document.addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) {
    e.preventDefault();
    generate();
  }
});
el.cancel.addEventListener('click', () => state.controller?.abort());
el.reuseSeed.addEventListener('click', () => {
  if (!state.shown) return;
  el.seedMode.value = 'fixed';
  syncForm();
  el.seed.value = state.shown.kiln.seed;
});
el.copy.addEventListener('click', async () => {
  const text = el.code.textContent;
  try {
    await navigator.clipboard.writeText(text);
    el.copy.textContent = 'Copied';
  } catch {
    // No clipboard (a page not served over https or from localhost): select it for Ctrl+C.
    getSelection().selectAllChildren(el.code);
    el.copy.textContent = 'Selected';
  }
  setTimeout(() => (el.copy.textContent = 'Copy'), 1500);
});
el.history.addEventListener('click', (e) => {
  const button = e.target.closest('button[data-id]');
  if (button) reuse(Number(button.dataset.id));
});
el.clearHistory.addEventListener('click', async () => {
  await clearEntries();
  await renderHistory();
});
el.keyButton.addEventListener('click', async () => {
  if (await askKey(hasApiKey() ? 'Replace the key this page sends.' : 'Enter the API key of this server.')) loadModels();
});

syncForm();
renderHistory().catch((err) => console.warn('history unavailable', err));
loadModels().finally(() => document.body.classList.add('ready'));
