// "Copy as code": the request that reproduces a shown image exactly (its model, size, seed,
// steps, scheduler and guidance as the API reported them), for curl, the OpenAI Python SDK and
// the OpenAI Node SDK. Kiln's extensions go in Python's extra_body; Node's SDK sends unknown
// fields as they are.

/**
 * The fields that pin an image down: what was asked for, with everything the server chose
 * (seed, steps, scheduler, guidance) taken from its answer's `kiln` block.
 */
export function reproducingFields(request, kiln) {
  const f = {};
  f.model = request.model || kiln.model;
  f.prompt = request.prompt;
  if (request.negative_prompt) f.negative_prompt = request.negative_prompt;
  f.size = kiln.size ?? request.size;
  f.seed = kiln.seed;
  f.steps = kiln.steps;
  f.scheduler = kiln.scheduler;
  f.guidance_scale = kiln.guidance_scale;
  if (kiln.strength !== undefined && kiln.mode !== 'pose') f.strength = kiln.strength;
  if (request.user) f.user = request.user;
  f.response_format = 'b64_json';
  return f;
}

/** What the OpenAI SDKs take as named arguments (the rest are Kiln's extensions). */
const SDK_FIELDS = new Set(['model', 'prompt', 'size', 'user', 'response_format']);

function shellQuote(text) {
  return `'${String(text).replace(/'/g, `'\\''`)}'`;
}

/** A Python literal (JSON's string escapes are Python's too). */
function py(value) {
  return typeof value === 'string' ? JSON.stringify(value) : String(value);
}

/**
 * Snippets for `fields` (reproducingFields) against `origin`. `edit`: {image, mask?} file names
 * for an edit; `authorized`: whether the server wants a key (read from $KILN_API_KEY).
 */
export function codeSnippets({ origin, fields, edit, out, authorized }) {
  const base = `${origin}/v1`;
  const path = edit ? 'images/edits' : 'images/generations';
  const names = Object.keys(fields);

  const curl = [`curl -sS ${base}/${path}`];
  if (authorized) curl.push(`-H "Authorization: Bearer $KILN_API_KEY"`);
  if (edit) {
    curl.push(`-F image=@${shellQuote(edit.image)}`);
    if (edit.mask) curl.push(`-F mask=@${shellQuote(edit.mask)}`);
    // --form-string: a value starting with @ or < is text, not a file.
    for (const name of names) curl.push(`--form-string ${shellQuote(`${name}=${fields[name]}`)}`);
  } else {
    curl.push(`-H 'Content-Type: application/json'`);
    curl.push(`-d ${shellQuote(JSON.stringify(fields))}`);
  }
  const curlText = `${curl.join(' \\\n  ')} \\\n  | jq -r '.data[0].b64_json' | base64 --decode > ${shellQuote(out)}\n`;

  const pyArgs = [];
  if (edit) {
    pyArgs.push(`image=open(${py(edit.image)}, "rb")`);
    if (edit.mask) pyArgs.push(`mask=open(${py(edit.mask)}, "rb")`);
  }
  const extra = [];
  for (const name of names) {
    if (SDK_FIELDS.has(name)) pyArgs.push(`${name}=${py(fields[name])}`);
    else extra.push(`"${name}": ${py(fields[name])}`);
  }
  if (extra.length) pyArgs.push(`extra_body={${extra.join(', ')}}`);
  const pythonText =
    'import base64\nimport os\n\nfrom openai import OpenAI\n\n' +
    `client = OpenAI(base_url=${py(base)}, api_key=os.environ.get("KILN_API_KEY", "unused"))\n` +
    `result = client.images.${edit ? 'edit' : 'generate'}(\n${pyArgs.map((a) => `    ${a},\n`).join('')})\n` +
    `with open(${py(out)}, "wb") as f:\n    f.write(base64.b64decode(result.data[0].b64_json))\n`;

  const jsArgs = [];
  if (edit) {
    jsArgs.push(`image: fs.createReadStream(${JSON.stringify(edit.image)})`);
    if (edit.mask) jsArgs.push(`mask: fs.createReadStream(${JSON.stringify(edit.mask)})`);
  }
  for (const name of names) jsArgs.push(`${name}: ${typeof fields[name] === 'string' ? JSON.stringify(fields[name]) : fields[name]}`);
  const nodeText =
    "// save as kiln.mjs; npm install openai; node kiln.mjs\nimport fs from 'node:fs';\nimport OpenAI from 'openai';\n\n" +
    `const client = new OpenAI({ baseURL: ${JSON.stringify(base)}, apiKey: process.env.KILN_API_KEY ?? 'unused' });\n` +
    `const result = await client.images.${edit ? 'edit' : 'generate'}({\n${jsArgs.map((a) => `  ${a},\n`).join('')}});\n` +
    `fs.writeFileSync(${JSON.stringify(out)}, Buffer.from(result.data[0].b64_json, 'base64'));\n`;

  return { curl: curlText, python: pythonText, node: nodeText };
}
