// SPDX-License-Identifier: GPL-2.0
/* kmt_kmalloc: kmalloc(64, GFP_KERNEL)/kfree (__kmalloc_cache_noprof on 6.12). */
#include <linux/init.h>
#include <linux/module.h>
#include <linux/printk.h>
#include <linux/slab.h>

static void *kmt_kmalloc_buf;

static int __init kmt_kmalloc_init(void)
{
	kmt_kmalloc_buf = kmalloc(64, GFP_KERNEL);
	if (!kmt_kmalloc_buf)
		return -ENOMEM;
	pr_info("kmt_kmalloc: loaded\n");
	return 0;
}

static void __exit kmt_kmalloc_exit(void)
{
	kfree(kmt_kmalloc_buf);
}

module_init(kmt_kmalloc_init);
module_exit(kmt_kmalloc_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kmodd test module: kmalloc and kfree");
