/**
 * Checks on uploaded images, run before any work is queued: the PNG signature, the header's
 * dimensions against a pixel budget (a small file can declare a huge image: a decompression
 * bomb), and a full decode.
 */
import { crc32 } from 'node:zlib';
import sharp from 'sharp';
import { ApiError } from './errors.js';

const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);

// libvips' operation cache (by default up to 50 MB and 100 operations, for the whole process)
// only pays off when the same image is processed again; uploads, masks and generated images
// never are, so it would only keep decoded pixels of hostile uploads alive.
sharp.cache(false);

export interface UploadLimits {
  /** Largest file in bytes. */
  maxBytes: number;
  /** Largest width x height. */
  maxPixels: number;
}

/** Throws ApiError (413, 415 or 400, naming `param`) unless `bytes` is a decodable PNG within the limits. */
export async function checkPngUpload(bytes: Buffer, param: string, limits: UploadLimits): Promise<{ width: number; height: number }> {
  if (bytes.length > limits.maxBytes) {
    throw new ApiError(413, `'${param}' is larger than ${limits.maxBytes} bytes.`, param, 'file_too_large');
  }
  if (bytes.length < 8 || !bytes.subarray(0, 8).equals(PNG_SIGNATURE)) {
    throw new ApiError(415, `'${param}' must be a PNG file.`, param, 'invalid_image_format');
  }
  // The first chunk must be IHDR: length 13, then width and height (big-endian uint32).
  if (bytes.length < 33 || bytes.readUInt32BE(8) !== 13 || bytes.toString('latin1', 12, 16) !== 'IHDR') {
    throw new ApiError(400, `'${param}' is not a valid PNG: its header is missing or malformed.`, param, 'invalid_image');
  }
  const width = bytes.readUInt32BE(16);
  const height = bytes.readUInt32BE(20);
  if (width === 0 || height === 0) {
    throw new ApiError(400, `'${param}' is not a valid PNG: it declares a ${width}x${height} image.`, param, 'invalid_image');
  }
  if (width * height > limits.maxPixels) {
    throw new ApiError(
      400,
      `'${param}' is ${width}x${height} pixels; at most ${limits.maxPixels} pixels are accepted.`,
      param,
      'image_too_large',
    );
  }
  checkChunks(bytes, param);
  try {
    // Decodes every row (streamed and shrunk, so memory stays small) and fails on any error.
    await sharp(bytes, { limitInputPixels: limits.maxPixels, sequentialRead: true, failOn: 'warning' })
      .resize(16, 16, { fit: 'fill' })
      .raw()
      .toBuffer();
  } catch (err) {
    const detail = err instanceof Error ? err.message.split('\n')[0] : String(err);
    throw new ApiError(400, `'${param}' could not be decoded as a PNG (${detail}).`, param, 'invalid_image');
  }
  return { width, height };
}

/**
 * Walks the chunk list: every chunk within the file and with a correct CRC, ending at IEND.
 * (Decoders forgive a missing IEND or a bad CRC in places; an upload that needs forgiving is corrupt.)
 */
function checkChunks(bytes: Buffer, param: string): void {
  const corrupt = (why: string) => new ApiError(400, `'${param}' is not a valid PNG: ${why}.`, param, 'invalid_image');
  let offset = 8;
  for (;;) {
    if (offset + 12 > bytes.length) throw corrupt('it ends before its IEND chunk');
    const length = bytes.readUInt32BE(offset);
    const end = offset + 12 + length;
    if (length > 0x7fffffff || end > bytes.length) throw corrupt('a chunk runs past the end of the file');
    const type = bytes.toString('latin1', offset + 4, offset + 8);
    if (!/^[A-Za-z]{4}$/.test(type)) throw corrupt('a chunk has an invalid type');
    const crc = crc32(bytes.subarray(offset + 4, offset + 8 + length)) >>> 0;
    if (crc !== bytes.readUInt32BE(offset + 8 + length)) throw corrupt(`the ${type} chunk's checksum is wrong`);
    offset = end;
    if (type === 'IEND') return;
  }
}
