/**
 * Image encoding (sharp) and the PNG text chunk that records how an image was made.
 *
 * sharp cannot write PNG tEXt chunks, so the chunk is spliced in after IHDR here: a few bytes
 * of framing and a CRC, defined by the PNG spec.
 */
import { crc32 } from 'node:zlib';
import sharp from 'sharp';
import type { RgbImage } from './vae.js';
import type { EffectiveSettings } from './pipeline.js';

export type OutputFormat = 'png' | 'jpeg' | 'webp';
export const OUTPUT_FORMATS: readonly OutputFormat[] = ['png', 'jpeg', 'webp'];

export interface EncodeOptions {
  format?: OutputFormat;
  /** 0-100 for jpeg/webp (OpenAI's output_compression). */
  quality?: number;
  /** tEXt entries for PNG output (keyword -> Latin-1 text). */
  text?: Record<string, string>;
}

export async function encodeImage(image: RgbImage, options: EncodeOptions = {}): Promise<Buffer> {
  const input = sharp(Buffer.from(image.pixels.buffer, image.pixels.byteOffset, image.pixels.byteLength), {
    raw: { width: image.width, height: image.height, channels: 3 },
  });
  switch (options.format ?? 'png') {
    case 'jpeg':
      return input.jpeg({ quality: options.quality ?? 90 }).toBuffer();
    case 'webp':
      return input.webp({ quality: options.quality ?? 90 }).toBuffer();
    case 'png': {
      const png = await input.png({ compressionLevel: 6, adaptiveFiltering: false }).toBuffer();
      return options.text ? insertPngText(png, options.text) : png;
    }
  }
}

const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);

/** Adds tEXt chunks right after IHDR. Non-Latin-1 characters are replaced by '?'. */
export function insertPngText(png: Buffer, entries: Record<string, string>): Buffer {
  if (!png.subarray(0, 8).equals(PNG_SIGNATURE)) throw new Error('not a PNG');
  const ihdrEnd = 8 + 8 + png.readUInt32BE(8) + 4; // signature, length+type, data, crc
  const chunks = Object.entries(entries).map(([keyword, text]) => {
    const data = Buffer.from(`${keyword}\0${text.replace(/[^\x20-\xff\n]/g, '?')}`, 'latin1');
    const typeAndData = Buffer.concat([Buffer.from('tEXt', 'latin1'), data]);
    const chunk = Buffer.alloc(4 + typeAndData.length + 4);
    chunk.writeUInt32BE(data.length, 0);
    typeAndData.copy(chunk, 4);
    chunk.writeUInt32BE(crc32(typeAndData) >>> 0, 4 + typeAndData.length);
    return chunk;
  });
  return Buffer.concat([png.subarray(0, ihdrEnd), ...chunks, png.subarray(ihdrEnd)]);
}

/** Reads the tEXt chunks of a PNG (for tests and `kiln` tools). */
export function readPngText(png: Buffer): Record<string, string> {
  const out: Record<string, string> = {};
  let offset = 8;
  while (offset + 8 <= png.length) {
    const length = png.readUInt32BE(offset);
    const type = png.toString('latin1', offset + 4, offset + 8);
    if (type === 'tEXt') {
      const data = png.subarray(offset + 8, offset + 8 + length);
      const nul = data.indexOf(0);
      out[data.toString('latin1', 0, nul)] = data.toString('latin1', nul + 1);
    }
    if (type === 'IEND') break;
    offset += 12 + length;
  }
  return out;
}

/** The generation parameters in the A1111 "parameters" convention most tools read. */
export function parametersText(s: EffectiveSettings): string {
  // LoRAs as A1111 writes them: tags in the prompt line, so that tools reading it apply them again.
  const lines = [[s.prompt, ...(s.loras ?? []).map((l) => `<lora:${l.name}:${l.scale}>`)].filter(Boolean).join(' ')];
  if (s.negativePrompt) lines.push(`Negative prompt: ${s.negativePrompt}`);
  lines.push(
    `Steps: ${s.steps}, Sampler: ${s.scheduler}, CFG scale: ${s.guidanceScale}, Seed: ${s.seed}, ` +
      `Size: ${s.width}x${s.height}, Model: ${s.model}, Quality: ${s.quality}, ` +
      (s.strength !== undefined ? `Denoising strength: ${s.strength}, ` : '') +
      'Generator: kiln',
  );
  return lines.join('\n');
}

/** PNG bytes of a generated image, with its parameters in a tEXt chunk. */
export function encodeGeneratedPng(image: RgbImage, settings: EffectiveSettings): Promise<Buffer> {
  return encodeImage(image, { format: 'png', text: { parameters: parametersText(settings) } });
}
