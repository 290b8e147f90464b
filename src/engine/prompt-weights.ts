/**
 * Inline prompt weights → a list of text fragments with a weight each.
 *
 * Accepted syntax (weights multiply when nested; conditioning.ts turns them into compel's weighting):
 *  - `(some words)1.2`   a group directly followed by a number (Block Entropy, compel)
 *  - `(some words)(1.2)` a group directly followed by a number in parentheses
 *  - `word(1.2)`         a word directly followed by a number in parentheses (Block Entropy's
 *                        documented form; compel reads it as one literal word: a deliberate exception)
 *  - `word+` `word++` `(group)-` `(group)--`  each `+` multiplies by 1.1, each `-` by 0.9 (compel)
 *  - `(some words:1.2)`  A1111's colon form (compel reads it as text: the other deliberate exception)
 *  - `(some words)`      a bare group only groups: weight 1, parentheses removed (compel; NOT
 *                        A1111's implicit 1.1)
 *  - `\(` `\)` `\\` `\+` `\-` `\:`  escapes: the character is plain text
 *
 * Deliberate rules (see test/prompt-weights.test.ts):
 *  - Weight syntax must touch what it weights and be followed by whitespace, punctuation or the
 *    end: `word (1.2)` (with a space) is NOT a weight and stays literal, `(ball)abc`, `(ball)0.5x`,
 *    `(ball)1.2.3`, `()1.2` stay literal.
 *  - A group whose whole content is a number (`(1990)`, `(1.5)`) that is not used as a weight is
 *    kept verbatim, parentheses included.
 *  - Plain numbers are text: `3 cats`, `1990s car`, `version 2.0`. Only words containing a letter
 *    take `+`/`-`/`(n)`, so `10+`, `18+`, `2(3)` stay literal. `word1.5` is not a weight.
 *  - Explicit numbers must be plain decimals in [0, MAX_PROMPT_WEIGHT]; a negative, signed,
 *    exponent or larger number makes that syntax literal text. Products of nested weights and long
 *    `+` runs are clamped to [0, MAX_PROMPT_WEIGHT] (embeddings scaled further overflow fp16 and
 *    only produce noise). Weights are rounded to 12 significant digits (1.1² → 1.21).
 *  - Unbalanced parentheses are literal characters; matched pairs elsewhere still work. Nesting
 *    deeper than 32 levels is literal (bounded recursion; never throws).
 *  - Fragments are whitespace-collapsed and trimmed; the caller joins them with spaces (CLIP
 *    tokenizes `cat ,` and `cat,` identically). Empty fragments are dropped.
 *  - Adjacent fragments with equal weight merge, except that each explicitly weighted word or
 *    group stays its own fragment (`in a (forest)1.0` → `in a`, `forest`, as in Block Entropy's
 *    example). Removed syntax (parentheses of a bare group) acts as a word break.
 */

export interface WeightedFragment {
  text: string;
  weight: number;
}

/** Largest explicit weight accepted, and the clamp for effective (multiplied) weights. */
export const MAX_PROMPT_WEIGHT = 10;

const MAX_DEPTH = 32;
const ESCAPABLE = new Set(['(', ')', '\\', '+', '-', ':']);
const WORD_CHAR = /[\p{L}\p{N}\p{M}_]/u;
const LETTER = /\p{L}/u;
const SPACE = /\s/u;
const DIGIT = /[0-9]/;
const WORD_JOINERS = new Set(["'", '\u2019', '-']);
/** Looks like a number someone meant as a weight (so it must either be valid or stay literal). */
const NUMBERISH = /^[+-]?[0-9.]*[0-9][0-9.eE+-]*$/;
/** A valid explicit weight inside `(…)` or after `:`. */
const VALID_NUMBER = /^(?:[0-9]+\.?[0-9]*|\.[0-9]+)$/;

interface Run {
  text: string;
  weight: number;
  seg: number;
}

export function parsePromptWeights(text: string): WeightedFragment[] {
  if (typeof text !== 'string') return [];

  // Lex into characters (code points), resolving escapes; escaped characters are never syntax.
  const chars: string[] = [];
  const escaped: boolean[] = [];
  const cps = Array.from(text);
  for (let i = 0; i < cps.length; i++) {
    if (cps[i] === '\\' && i + 1 < cps.length && ESCAPABLE.has(cps[i + 1])) {
      chars.push(cps[i + 1]);
      escaped.push(true);
      i++;
    } else {
      chars.push(cps[i]);
      escaped.push(false);
    }
  }
  const n = chars.length;
  const is = (i: number, ch: string) => i < n && !escaped[i] && chars[i] === ch;
  const isWord = (i: number) => i < n && WORD_CHAR.test(chars[i]);
  const slice = (a: number, b: number) => chars.slice(a, b).join('');

  // Match parentheses; unmatched ones and those nested too deep stay literal.
  const match = new Int32Array(n).fill(-1);
  const stack: Array<{ at: number; deep: boolean }> = [];
  for (let i = 0; i < n; i++) {
    if (is(i, '(')) stack.push({ at: i, deep: stack.length >= MAX_DEPTH });
    else if (is(i, ')') && stack.length > 0) {
      const open = stack.pop()!;
      if (!open.deep) {
        match[open.at] = i;
        match[i] = open.at;
      }
    }
  }

  /** What may follow weight syntax: end of the enclosing group, whitespace or punctuation. */
  const boundary = (i: number, hi: number): boolean => {
    if (i >= hi) return true;
    if (SPACE.test(chars[i])) return true;
    if (isWord(i) || is(i, '+') || is(i, '-')) return false;
    // `1.2.3` or `1,5`: a number went on, so what came before was not a complete weight.
    if ((chars[i] === '.' || chars[i] === ',') && i + 1 < hi && DIGIT.test(chars[i + 1])) return false;
    return true;
  };

  const isNumericGroup = (open: number): boolean => {
    const close = match[open];
    return close > open && NUMBERISH.test(slice(open + 1, close).trim());
  };
  const validWeight = (s: string): number | undefined => {
    if (!VALID_NUMBER.test(s)) return undefined;
    const w = Number(s);
    return Number.isFinite(w) && w <= MAX_PROMPT_WEIGHT ? w : undefined;
  };

  /** `+`/`-` run at i followed by a boundary → its weight. */
  const signRun = (i: number, hi: number): { weight: number; end: number } | undefined => {
    const sign = is(i, '+') ? '+' : is(i, '-') ? '-' : undefined;
    if (!sign) return undefined;
    let j = i;
    while (j < hi && is(j, sign)) j++;
    if (!boundary(j, hi)) return undefined;
    return { weight: (sign === '+' ? 1.1 : 0.9) ** (j - i), end: j };
  };

  /** `(number)` at i followed by a boundary → its weight; 'literal' when it looks like one but is not valid. */
  const parenNumber = (i: number, hi: number): { weight: number; end: number } | 'literal' | undefined => {
    if (!is(i, '(') || match[i] < 0 || !isNumericGroup(i)) return undefined;
    const close = match[i];
    const w = validWeight(slice(i + 1, close).trim());
    if (w === undefined || !boundary(close + 1, hi)) return 'literal';
    return { weight: w, end: close + 1 };
  };

  /** What follows a group's `)`: a weight, nothing (bare group), or undefined when malformed. */
  const groupSuffix = (i: number, hi: number): { weight: number; end: number; explicit: boolean } | undefined => {
    const run = signRun(i, hi);
    if (run) return { ...run, explicit: true };
    if (is(i, '+') || is(i, '-')) return undefined;
    if (i < hi && (DIGIT.test(chars[i]) || (chars[i] === '.' && i + 1 < hi && DIGIT.test(chars[i + 1])))) {
      // Look at a bounded window: slicing to `hi` on every group would be O(n²).
      const m = /^(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)/.exec(slice(i, Math.min(hi, i + 40)))!;
      const end = i + m[0].length;
      const w = validWeight(m[0]);
      return w !== undefined && boundary(end, hi) ? { weight: w, end, explicit: true } : undefined;
    }
    const pn = parenNumber(i, hi);
    if (pn === 'literal') return undefined;
    if (pn) return { ...pn, explicit: true };
    return boundary(i, hi) ? { weight: 1, end: i, explicit: false } : undefined;
  };

  /** A1111 `(text:1.2)`: the last top-level `:` followed only by a number. */
  const colonWeight = (lo: number, hi: number): { weight: number; contentEnd: number } | 'literal' | undefined => {
    let colon = -1;
    for (let i = lo; i < hi; i++) {
      if (match[i] > i) i = match[i];
      else if (is(i, ':')) colon = i;
    }
    if (colon < 0) return undefined;
    const tail = slice(colon + 1, hi).trim();
    if (!NUMBERISH.test(tail)) return undefined;
    const w = validWeight(tail);
    if (w === undefined || slice(lo, colon).trim() === '') return 'literal';
    return { weight: w, contentEnd: colon };
  };

  const runs: Run[] = [];
  let nextSeg = 1;
  const emit = (s: string, weight: number, seg: number) => {
    const last = runs[runs.length - 1];
    if (last && last.weight === weight && last.seg === seg) last.text += s;
    else runs.push({ text: s, weight, seg });
  };
  // Removed syntax separates words: `photo(realistic)` must not become `photorealistic`. Only
  // needed between word characters, so `, (x),` does not turn into `, x ,`.
  const wordBreakBefore = () => {
    const last = runs[runs.length - 1];
    if (last && WORD_CHAR.test(last.text.slice(-1))) last.text += ' ';
  };
  const wordBreakAfter = (next: number) => {
    if (isWord(next) && runs.length > 0) runs[runs.length - 1].text += ' ';
  };

  const parse = (lo: number, hi: number, weight: number, seg: number): void => {
    let i = lo;
    while (i < hi) {
      if (is(i, '(') && match[i] > i) {
        const close = match[i];
        if (isNumericGroup(i) || slice(i + 1, close).trim() === '') {
          emit(slice(i, close + 1), weight, seg);
          i = close + 1;
          continue;
        }
        const colon = colonWeight(i + 1, close);
        const suffix = groupSuffix(close + 1, hi);
        if (colon === 'literal' || suffix === undefined) {
          // Malformed: the parentheses are text, the content is still parsed.
          emit('(', weight, seg);
          parse(i + 1, close, weight, seg);
          emit(')', weight, seg);
          i = close + 1;
          continue;
        }
        const explicit = suffix.explicit || colon !== undefined;
        const groupWeight = weight * suffix.weight * (colon ? colon.weight : 1);
        wordBreakBefore();
        parse(i + 1, colon ? colon.contentEnd : close, groupWeight, explicit ? nextSeg++ : seg);
        wordBreakAfter(suffix.end);
        i = suffix.end;
        continue;
      }
      if (isWord(i)) {
        let j = i;
        while (isWord(j) && j < hi) j++;
        // Internal apostrophes and hyphens keep `it's`, `hot-dog` whole.
        while (j + 1 < hi && !escaped[j] && WORD_JOINERS.has(chars[j]) && isWord(j + 1)) {
          j++;
          while (isWord(j) && j < hi) j++;
        }
        const word = slice(i, j);
        if (LETTER.test(word)) {
          const suffix = signRun(j, hi) ?? parenNumber(j, hi);
          if (suffix === 'literal') {
            const close = match[j];
            emit(word + slice(j, close + 1), weight, seg);
            i = close + 1;
            continue;
          }
          if (suffix) {
            emit(word, weight * suffix.weight, nextSeg++);
            wordBreakAfter(suffix.end);
            i = suffix.end;
            continue;
          }
        }
        emit(word, weight, seg);
        i = j;
        continue;
      }
      emit(chars[i], weight, seg);
      i++;
    }
  };
  parse(0, n, 1, 0);

  const out: Array<WeightedFragment & { seg: number }> = [];
  for (const run of runs) {
    const t = run.text.replace(/\s+/gu, ' ').trim();
    if (t === '') continue;
    const weight = finalWeight(run.weight);
    const last = out[out.length - 1];
    if (last && last.weight === weight && last.seg === run.seg) last.text += ` ${t}`;
    else out.push({ text: t, weight, seg: run.seg });
  }
  return out.map(({ text: t, weight }) => ({ text: t, weight }));
}

function finalWeight(w: number): number {
  const clamped = Math.min(MAX_PROMPT_WEIGHT, Math.max(0, w));
  return Number(clamped.toPrecision(12));
}
