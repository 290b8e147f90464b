#!/usr/bin/env node
// The published entry point runs the compiled CLI (`npm ci` builds it through `prepare`).
import '../dist/cli/main.js';
