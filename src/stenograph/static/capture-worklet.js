// Audio thread: resamples the microphone to 16 kHz mono and posts ~100 ms frames ready for the wire.
//
// The resampler is a windowed-sinc interpolator (low-pass below the output's Nyquist frequency, so a 48 kHz
// microphone does not alias into the speech band), streaming: it keeps just enough input history to
// compute the next output sample. Each frame is posted with its RMS level so the page can draw a meter
// and notice where speech ends without touching the samples again.

const ZERO_CROSSINGS = 12; // kernel half-width, in zero crossings of the sinc
const TABLE_STEPS = 256; // kernel samples per input sample (linear interpolation between them)

class SincResampler {
  constructor(inRate, outRate) {
    this.step = inRate / outRate; // input samples advanced per output sample
    this.passthrough = inRate === outRate;
    // Cut off a little below the output Nyquist frequency; the transition band is where speech has none.
    this.cutoff = Math.min(1, outRate / inRate) * 0.94;
    this.half = Math.ceil(ZERO_CROSSINGS / this.cutoff);
    const n = this.half * TABLE_STEPS;
    this.table = new Float32Array(n + 2);
    for (let i = 0; i <= n; i++) {
      const x = i / TABLE_STEPS;
      const arg = Math.PI * this.cutoff * x;
      const sinc = x === 0 ? 1 : Math.sin(arg) / arg;
      const window = 0.42 + 0.5 * Math.cos((Math.PI * x) / this.half) + 0.08 * Math.cos((2 * Math.PI * x) / this.half);
      this.table[i] = this.cutoff * sinc * window;
    }
    // Input history, starting with `half` zeros so the first output sample is centred on the first input.
    this.buffer = new Float32Array(4096);
    this.length = this.half;
    this.position = this.half;
  }

  kernel(distance) {
    const scaled = Math.abs(distance) * TABLE_STEPS;
    const i = Math.floor(scaled);
    if (i >= this.table.length - 1) return 0;
    const frac = scaled - i;
    return this.table[i] + (this.table[i + 1] - this.table[i]) * frac;
  }

  append(input) {
    if (this.length + input.length > this.buffer.length) {
      const grown = new Float32Array(Math.max(this.buffer.length * 2, this.length + input.length));
      grown.set(this.buffer.subarray(0, this.length));
      this.buffer = grown;
    }
    this.buffer.set(input, this.length);
    this.length += input.length;
  }

  // Returns the output samples that the input so far determines completely.
  push(input) {
    if (this.passthrough) return Float32Array.from(input);
    this.append(input);
    const out = [];
    const buf = this.buffer;
    while (this.position + this.half < this.length) {
      const t = this.position;
      const first = Math.ceil(t - this.half);
      const last = Math.floor(t + this.half);
      let acc = 0;
      for (let k = first; k <= last; k++) acc += buf[k] * this.kernel(t - k);
      out.push(acc);
      this.position += this.step;
    }
    // Drop history the next output no longer reaches.
    const drop = Math.max(0, Math.floor(this.position - this.half));
    if (drop > 0) {
      buf.copyWithin(0, drop, this.length);
      this.length -= drop;
      this.position -= drop;
    }
    return Float32Array.from(out);
  }
}

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { targetRate = 16000, frameMs = 100, encoding = "pcm_s16le" } = options.processorOptions || {};
    this.encoding = encoding;
    this.resampler = new SincResampler(sampleRate, targetRate);
    this.frame = new Float32Array(Math.round((targetRate * frameMs) / 1000));
    this.filled = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true;
    // Mono: average the channels the browser hands us (usually one).
    const mono = new Float32Array(channels[0].length);
    for (const channel of channels) for (let i = 0; i < mono.length; i++) mono[i] += channel[i] / channels.length;
    const resampled = this.resampler.push(mono);
    let offset = 0;
    while (offset < resampled.length) {
      const take = Math.min(this.frame.length - this.filled, resampled.length - offset);
      this.frame.set(resampled.subarray(offset, offset + take), this.filled);
      this.filled += take;
      offset += take;
      if (this.filled === this.frame.length) {
        this.emit();
        this.filled = 0;
      }
    }
    return true;
  }

  emit() {
    let energy = 0;
    for (const s of this.frame) energy += s * s;
    const rms = Math.sqrt(energy / this.frame.length);
    let payload;
    if (this.encoding === "pcm_f32le") {
      payload = Float32Array.from(this.frame).buffer; // little-endian on every platform browsers run on
    } else {
      const pcm = new Int16Array(this.frame.length);
      for (let i = 0; i < pcm.length; i++) {
        const s = Math.max(-1, Math.min(1, this.frame[i]));
        pcm[i] = s < 0 ? s * 0x8000 : s * 0x7fff;
      }
      payload = pcm.buffer;
    }
    this.port.postMessage({ audio: payload, rms }, [payload]);
  }
}

registerProcessor("stenograph-capture", CaptureProcessor);
