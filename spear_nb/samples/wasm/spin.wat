;; spin.wat - spear reactor ABI v1 sample whose spear_handle never returns.
;;
;; Used to demonstrate timeouts: the host must interrupt it, e.g. with
;; wasmtime epoch interruption (Config.epoch_interruption + a deadline) or
;; fuel. It imports nothing from "spear" (a module may import any subset).
(module
  (memory (export "memory") 1)

  (global $heap_base i32 (i32.const 16))
  (global $bump (mut i32) (i32.const 16))
  (global $spins (mut i64) (i64.const 0))

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

  ;; Loops forever, counting iterations in a global; never returns.
  (func (export "spear_handle") (param $ptr i32) (param $len i32) (result i64)
    (loop $forever
      (global.set $spins (i64.add (global.get $spins) (i64.const 1)))
      (br $forever))
    unreachable)
)
