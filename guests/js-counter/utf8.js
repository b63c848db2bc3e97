// UTF-8 between strings and Uint8Array, for guests built with QuickJS
// (componentize-qjs), which has no TextEncoder or TextDecoder. Decoding is
// strict, like serde_json's: an invalid sequence is an error, never a
// replacement character, so every replica refuses the same bytes.

/** The UTF-8 bytes of `text` (a lone surrogate becomes U+FFFD, as TextEncoder does). */
export function utf8Encode(text) {
  const bytes = [];
  for (const character of text) {
    let point = character.codePointAt(0);
    if (point >= 0xd800 && point <= 0xdfff) {
      point = 0xfffd;
    }
    if (point < 0x80) {
      bytes.push(point);
    } else if (point < 0x800) {
      bytes.push(0xc0 | (point >> 6), 0x80 | (point & 0x3f));
    } else if (point < 0x10000) {
      bytes.push(0xe0 | (point >> 12), 0x80 | ((point >> 6) & 0x3f), 0x80 | (point & 0x3f));
    } else {
      bytes.push(
        0xf0 | (point >> 18),
        0x80 | ((point >> 12) & 0x3f),
        0x80 | ((point >> 6) & 0x3f),
        0x80 | (point & 0x3f),
      );
    }
  }
  return new Uint8Array(bytes);
}

/** The text of UTF-8 `bytes`; throws a string naming the first invalid byte. */
export function utf8Decode(bytes) {
  const units = [];
  let at = 0;
  while (at < bytes.length) {
    const lead = bytes[at];
    let length;
    let point;
    let lowest;
    if (lead < 0x80) {
      units.push(lead);
      at += 1;
      continue;
    } else if (lead >= 0xc2 && lead <= 0xdf) {
      [length, point, lowest] = [2, lead & 0x1f, 0x80];
    } else if (lead >= 0xe0 && lead <= 0xef) {
      [length, point, lowest] = [3, lead & 0x0f, 0x800];
    } else if (lead >= 0xf0 && lead <= 0xf4) {
      [length, point, lowest] = [4, lead & 0x07, 0x10000];
    } else {
      throw `invalid UTF-8 at byte ${at}`;
    }
    if (at + length > bytes.length) {
      throw `invalid UTF-8 at byte ${at}`;
    }
    for (let next = 1; next < length; next++) {
      const continuation = bytes[at + next];
      if ((continuation & 0xc0) !== 0x80) {
        throw `invalid UTF-8 at byte ${at}`;
      }
      point = (point << 6) | (continuation & 0x3f);
    }
    // Overlong forms, surrogates and points past U+10FFFF are not UTF-8.
    if (point < lowest || (point >= 0xd800 && point <= 0xdfff) || point > 0x10ffff) {
      throw `invalid UTF-8 at byte ${at}`;
    }
    if (point >= 0x10000) {
      point -= 0x10000;
      units.push(0xd800 | (point >> 10), 0xdc00 | (point & 0x3ff));
    } else {
      units.push(point);
    }
    at += length;
  }
  // In slices: spreading a long array into one call can exceed the engine's
  // argument limit.
  let text = '';
  for (let start = 0; start < units.length; start += 4096) {
    text += String.fromCharCode(...units.slice(start, start + 4096));
  }
  return text;
}
