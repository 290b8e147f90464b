/**
 * Checks on uploaded images, run before any work is queued: the PNG signature, the header's
 * dimensions against a pixel budget (a small file can declare a huge image: a decompression
 * bomb), and a full decode.
 */
import sharp from 'sharp';
import { ApiError } from './errors.js';

const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);

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
