;; upper.wat - spear reactor ABI v1 sample.
;;
;; spear_handle(ptr, len) returns a copy of the payload with ASCII letters
;; a-z turned into A-Z (every other byte is copied unchanged), and calls the
;; host import spear.log once per call with "upper: N bytes".
;;
;; Memory layout (one 64 KiB page to start with):
;;   [0, 7)    "upper: "        constant message prefix
;;   [8, 14)   " bytes"         constant message suffix
;;   [16, 64)  scratch area where the log message is assembled (backwards)
;;   [64, ...) bump heap handed out by spear_alloc, reset by spear_reset
(module
  (import "spear" "log" (func $log (param i32 i32)))

  (memory (export "memory") 1)
  (data (i32.const 0) "upper: ")
  (data (i32.const 8) " bytes")

  (global $heap_base i32 (i32.const 64))
  (global $bump (mut i32) (i32.const 64))

  ;; Bump allocator: 8-byte aligned, grows memory on demand, traps when the
  ;; request cannot be satisfied.
  (func $alloc (export "spear_alloc") (param $size i32) (result i32)
    (local $start i32) (local $end i64) (local $have i64)
    (local.set $start
      (i32.and (i32.add (global.get $bump) (i32.const 7)) (i32.const -8)))
    (local.set $end
      (i64.add (i64.extend_i32_u (local.get $start))
               (i64.extend_i32_u (local.get $size))))
    (local.set $have
      (i64.shl (i64.extend_i32_u (memory.size)) (i64.const 16)))
    (if (i64.gt_u (local.get $end) (local.get $have))
      (then
        (if (i32.eq
              (memory.grow
                (i32.wrap_i64
                  (i64.shr_u
                    (i64.add (i64.sub (local.get $end) (local.get $have))
                             (i64.const 65535))
                    (i64.const 16))))
              (i32.const -1))
          (then unreachable))))
    (global.set $bump (i32.wrap_i64 (local.get $end)))
    (local.get $start))

  (func (export "spear_reset")
    (global.set $bump (global.get $heap_base)))

  (func (export "spear_handle") (param $ptr i32) (param $len i32) (result i64)
    (local $out i32) (local $i i32) (local $c i32) (local $p i32) (local $n i32)
    (local.set $out (call $alloc (local.get $len)))
    ;; uppercase loop
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
        (local.set $c
          (i32.load8_u (i32.add (local.get $ptr) (local.get $i))))
        (if (i32.lt_u (i32.sub (local.get $c) (i32.const 97)) (i32.const 26))
          (then (local.set $c (i32.sub (local.get $c) (i32.const 32)))))
        (i32.store8 (i32.add (local.get $out) (local.get $i)) (local.get $c))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    ;; build "upper: N bytes" backwards, ending at offset 64
    (local.set $p (i32.const 58))
    (memory.copy (local.get $p) (i32.const 8) (i32.const 6))
    (local.set $n (local.get $len))
    (loop $digit
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i32.store8 (local.get $p)
        (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
      (local.set $n (i32.div_u (local.get $n) (i32.const 10)))
      (br_if $digit (local.get $n)))
    (local.set $p (i32.sub (local.get $p) (i32.const 7)))
    (memory.copy (local.get $p) (i32.const 0) (i32.const 7))
    (call $log (local.get $p) (i32.sub (i32.const 64) (local.get $p)))
    ;; (result_ptr << 32) | result_len
    (i64.or
      (i64.shl (i64.extend_i32_u (local.get $out)) (i64.const 32))
      (i64.extend_i32_u (local.get $len))))
)
