/**
 * POST /v1/images/generations (JSON) and POST /v1/images/edits (multipart): parse and validate
 * the request, call the images service, reply. The schemas document the API (OpenAPI);
 * validation is params.ts and uploads.ts, which answer in OpenAI's shape.
 */
import { Transform } from 'node:stream';
import type { MultipartFile } from '@fastify/multipart';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { checkMaskMatchesImage } from '../../engine/inpaint.js';
import { ApiError } from '../errors.js';
import type { Caller, EditUpload, ImagesService } from '../images-service.js';
import { editWeights, paramsSchema, readParams, type ImageParams, type NMeaning } from '../params.js';
import { checkImageUpload, type UploadLimits } from '../uploads.js';
import type { UploadBudget, UploadHold } from '../upload-budget.js';
import { streamImages } from '../streaming.js';

export interface ImageRoutesOptions {
  images: ImagesService;
  limits: UploadLimits;
  /** Most images per edit request. */
  maxFiles: number;
  /** Request-body and upload bytes all requests may hold at once. */
  budget: UploadBudget;
  /** What `n` means (the seed, or the number of images). */
  nMeaning: NMeaning;
}

const imageItemSchema = {
  type: 'object',
  properties: {
    url: { type: 'string', description: 'Signed URL, valid until it expires (response_format=url).' },
    b64_json: { type: 'string', description: 'The image, base64 (response_format=b64_json).' },
    url_pose: { type: 'string', description: 'Edits in pose mode: the skeleton picture the image followed, as a signed URL.' },
    b64_json_pose: { type: 'string', description: 'Edits in pose mode: the skeleton picture, base64 (same format as the image).' },
    seed: { type: 'integer', description: 'The seed used.' },
    revised_prompt: { type: 'null' },
  },
};
const imagesResponseSchema = {
  200: {
    type: 'object',
    properties: {
      created: { type: 'integer' },
      data: { type: 'array', items: imageItemSchema },
      size: { type: 'string' },
      quality: { type: 'string' },
      output_format: { type: 'string' },
      kiln: { type: 'object', description: 'Effective settings and timings (also in x-kiln-* headers).', additionalProperties: true },
    },
  },
  default: {
    type: 'object',
    description: "OpenAI's error envelope.",
    properties: {
      error: {
        type: 'object',
        properties: { message: { type: 'string' }, type: { type: 'string' }, param: { type: ['string', 'null'] }, code: { type: ['string', 'null'] } },
      },
    },
  },
};

function caller(request: FastifyRequest, reply: FastifyReply): Caller {
  return { id: request.id, log: request.log, req: request.raw, res: reply.raw };
}

/** Sets the service's x-kiln-* headers; the body goes out as the handler's return value. */
function send<T>(reply: FastifyReply, result: { headers: Record<string, string>; body: T }): T {
  reply.headers(result.headers);
  return result.body;
}

/**
 * Reads one uploaded file, counting every chunk against the shared budget as it arrives: a
 * client that sends most of a file and then stalls holds budget, not uncounted memory.
 */
async function readFilePart(part: MultipartFile, param: 'image' | 'mask', hold: UploadHold, maxBytes: number): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of part.file as AsyncIterable<Buffer>) {
    hold.take(chunk.length);
    chunks.push(chunk);
  }
  // Busboy stops at the per-file limit and marks the stream truncated.
  if (part.file.truncated) throw new ApiError(413, `'${param}' is larger than ${maxBytes} bytes.`, param, 'file_too_large');
  return Buffer.concat(chunks);
}

/** The edit form's text fields (repeated ones as arrays), its images and its mask; ApiError for anything else. */
async function readEditForm(request: FastifyRequest, maxFiles: number, maxBytes: number, hold: UploadHold) {
  const fields: Record<string, string | string[]> = {};
  const images: Buffer[] = [];
  let mask: Buffer | undefined;
  try {
    for await (const part of request.parts()) {
      const name = part.fieldname;
      if (part.type === 'file') {
        if (name === 'image' || name === 'image[]') {
          if (images.length >= maxFiles) throw new ApiError(400, `At most ${maxFiles} images per request.`, 'image', 'too_many_files');
          images.push(await readFilePart(part, 'image', hold, maxBytes));
        } else if (name === 'mask') {
          mask = await readFilePart(part, 'mask', hold, maxBytes);
        } else {
          throw new ApiError(400, `Unexpected file field '${name.slice(0, 64)}'; files go in 'image' (or 'image[]') and 'mask'.`, name.slice(0, 64), 'invalid_field');
        }
      } else {
        if (name === 'image' || name === 'image[]' || name === 'mask') {
          throw new ApiError(400, `'${name}' must be a file upload.`, name === 'mask' ? 'mask' : 'image', 'invalid_type');
        }
        if (part.valueTruncated) throw new ApiError(413, `Form field '${name.slice(0, 64)}' is too long.`, name.slice(0, 64), 'field_too_large');
        const value = String(part.value);
        // Fields are held until the request is done, like files.
        hold.take(value.length);
        const prev = fields[name];
        fields[name] = prev === undefined ? value : Array.isArray(prev) ? [...prev, value] : [prev, value];
      }
    }
  } catch (err) {
    if (err instanceof ApiError || (err as { code?: string }).code?.startsWith('FST_')) throw err;
    throw new ApiError(400, `The multipart body is malformed: ${err instanceof Error ? err.message : String(err)}.`, null, 'invalid_multipart');
  }
  return { fields, images, mask };
}

/**
 * The checks on an edit's files, in order: an image, each a PNG, JPEG or WebP within the limits, a
 * mask matching the image; then what `user` / `style` ask for: pose mode takes no mask (an image
 * prompt it takes: `face:0.5,style:0.6,pose:1.0`).
 */
async function checkEditUpload(form: { images: Buffer[]; mask?: Buffer }, params: ImageParams, limits: UploadLimits): Promise<EditUpload> {
  if (form.images.length === 0) throw new ApiError(400, "Missing required parameter: 'image' (a PNG, JPEG or WebP file).", 'image', 'missing_required_parameter');
  const sizes = [];
  for (const image of form.images) sizes.push(await checkImageUpload(image, 'image', limits));
  const image = form.images[0]!;
  const mask = form.mask;
  if (mask) {
    await checkImageUpload(mask, 'mask', limits);
    await checkMaskMatchesImage(image, mask);
  }
  const { pose: poseScale, imagePrompt } = editWeights(params);
  if (poseScale !== undefined && mask) {
    throw new ApiError(400, 'A mask cannot be combined with pose mode (user=cn / pose:<w>); send one or the other.', 'mask', 'unsupported_value');
  }
  return { image, imageSize: sizes[0]!, mask, poseScale, imagePrompt };
}

export async function imageRoutes(app: FastifyInstance, { images, limits, maxFiles, budget, nMeaning }: ImageRoutesOptions): Promise<void> {
  app.post(
    '/v1/images/generations',
    {
      schema: {
        summary: 'Create an image from a prompt',
        description: 'With `stream: true`: server-sent events (text/event-stream), `partial_images` previews then the completed image (OpenAI\'s shape).',
        body: paramsSchema('generations', 'json'),
        response: imagesResponseSchema,
        security: [{ bearer: [] }],
      },
      // A JSON body is counted against the shared budgets as it arrives (its parsed form is held until the answer).
      preParsing: async (request, reply, payload) => {
        const hold = budget.holder();
        reply.raw.once('close', () => hold.release());
        // A declared length is taken at once: refused here, the answer keeps the connection
        // (Fastify closes it after a refusal while parsing), and the body is read and dropped.
        const declared = Number(request.headers['content-length']);
        const reserved = declared > 0 && declared <= request.routeOptions.bodyLimit ? declared : 0;
        if (reserved) hold.take(reserved);
        let seen = 0;
        const counted = new Transform({
          transform(chunk: Buffer, _encoding, done) {
            try {
              const beyond = Math.max(0, seen + chunk.length - Math.max(seen, reserved));
              seen += chunk.length;
              if (beyond) hold.take(beyond);
              done(null, chunk);
            } catch (err) {
              done(err as Error);
            }
          },
          flush(done) {
            hold.arrived();
            done();
          },
        });
        // Bytes flow only once Fastify reads (it resumes the stream with its listeners on), so a
        // refusal reaches it as an error instead of being emitted before anyone listens.
        counted.once('resume', () => payload.pipe(counted));
        // pipe() does not pass errors on: an aborted client must end the parse too. After a 413
        // on Content-Length Fastify never reads, and nothing may then go unhandled.
        payload.once('error', (err) => counted.destroy(err));
        counted.on('error', () => {});
        return counted;
      },
      preValidation: async (request) => {
        const type = String(request.headers['content-type'] ?? '').split(';')[0]!.trim().toLowerCase();
        if (type !== 'application/json') {
          throw new ApiError(415, `This endpoint takes application/json, not '${type || 'no content type'}'.`, null, 'unsupported_media_type');
        }
      },
    },
    async (request, reply) => {
      const params = readParams(request.body, 'generations', 'json', nMeaning);
      const who = caller(request, reply);
      if (params.stream) return streamImages(who, reply, 'image_generation', params, (hooks) => images.generate(who, params, hooks));
      return send(reply, await images.generate(who, params));
    },
  );

  const editsFormSchema = paramsSchema('edits', 'form') as { properties: Record<string, unknown>; required: string[] };
  app.post(
    '/v1/images/edits',
    {
      schema: {
        summary: 'Edit an uploaded picture (PNG, JPEG or WebP): image-to-image, inpainting (with a mask), pose-guided (user=cn) or as an image prompt (user=style:<w> / face:<w>)',
        description:
          'Without a mask: image-to-image (strength default 0.75). With a mask (same dimensions as the image; transparent pixels, ' +
          'or white ones in a mask without transparency, are repainted): inpainting (strength default 1). With `user=cn`, `pose:<w>` ' +
          'or a weight list with `pose`: the pose of the person in the image guides a new image (ControlNet OpenPose); the skeleton ' +
          'picture comes back as `url_pose` / `b64_json_pose`. With `style:<w>` / `face:<w>` in `user` (or a `style` weight): the upload ' +
          'is an image prompt (IP-Adapter) steering a new image at those weights (from noise; from the upload when `strength` is given; ' +
          'inpainting with a mask). With `stream: true`: server-sent events, `partial_images` previews then the completed image.',
        consumes: ['multipart/form-data'],
        body: {
          ...editsFormSchema,
          required: ['image', ...editsFormSchema.required],
          properties: {
            image: {
              type: 'string',
              format: 'binary',
              description: `PNG, JPEG or WebP, at most ${limits.maxBytes} bytes, EXIF orientation applied (also image[]: each is checked, the first is used).`,
            },
            mask: {
              type: 'string',
              format: 'binary',
              description:
                "PNG (or JPEG/WebP) with the image's dimensions: fully transparent pixels are repainted (OpenAI's convention); in a mask without transparency, white ones are.",
            },
            ...editsFormSchema.properties,
          },
        },
        response: imagesResponseSchema,
        security: [{ bearer: [] }],
      },
      preValidation: async (request) => {
        if (!request.isMultipart()) {
          const type = String(request.headers['content-type'] ?? '').split(';')[0]!.trim();
          throw new ApiError(415, `This endpoint takes multipart/form-data, not '${type || 'no content type'}'.`, null, 'unsupported_media_type');
        }
      },
    },
    async (request, reply) => {
      // The uploaded bytes stay held (and counted) until the job is done and the reply is built.
      const hold = budget.holder();
      try {
        const form = await readEditForm(request, maxFiles, limits.maxBytes, hold);
        hold.arrived();
        const params = readParams(form.fields, 'edits', 'form', nMeaning);
        const upload = await checkEditUpload(form, params, limits);
        const who = caller(request, reply);
        if (params.stream) return await streamImages(who, reply, 'image_edit', params, (hooks) => images.edit(who, params, upload, hooks));
        return send(reply, await images.edit(who, params, upload));
      } finally {
        hold.release();
      }
    },
  );
}
